"""Transformer pieces shared by the three towers and the pooling.

Parameter names follow big_vision (`MlpBlock_0/Dense_0`, `MultiHeadDotProductAttention_0/query`,
`encoderblock_{i}` or scanned `encoderblock`, `encoder_norm`, `MAPHead_0/probe`) so SigLIP 2
checkpoints map onto them by name. Every parameter carries logical axis names;
`caip_jax.sharding` maps them to the mesh.
Shapes: B batch, N tokens, Q queries, D width, H heads, K = D / H head width.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def logical(init, *names):
    """An initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """Flax LayerNorm (epsilon 1e-6, as SigLIP); statistics are computed in float32."""
    return nn.LayerNorm(
        dtype=dtype,
        scale_init=logical(nn.initializers.ones, "norm"),
        bias_init=logical(nn.initializers.zeros, "norm"),
        name=name,
    )


def activations(x: jax.Array) -> jax.Array:
    """Constrains a [B, N, D] activation to the batch-over-data, width-replicated layout."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
    """Dense -> tanh-approximate GELU -> Dense: [B, N, D] -> [B, N, D]."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
            bias_init=logical(nn.initializers.normal(stddev=1e-6), "mlp"),
        )(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = nn.gelu(x, approximate=True)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
            bias_init=logical(nn.initializers.normal(stddev=1e-6), "embed"),
        )(x)


class Projection(nn.Module):
    """x @ kernel + bias over the last `contract` axes of x, with the kernel [*in, *features]
    created in that shape (Flax's DenseGeneral layout).

    Not nn.DenseGeneral itself: it initialises a flattened 2-D kernel and reshapes it, and
    under logical-axis rules its 2-D box cannot take the kernel's 3-D axis names.
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]  # logical names of the kernel's axes, inputs first
    contract: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs = x.shape[-self.contract :]
        axes_in = tuple(range(self.contract))
        axes_out = tuple(range(self.contract, self.contract + len(self.features)))
        # Xavier-uniform over the flattened [prod(in), prod(out)] matrix, as Flax's MHA.
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=axes_in, out_axis=axes_out)
        kernel = self.param("kernel", logical(init, *self.names), (*inputs, *self.features))
        bias = self.param(
            "bias", logical(nn.initializers.zeros, *self.names[self.contract :]), self.features
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.contract)
        return y + bias.astype(self.dtype)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with Flax's parameter layout: query/key/value kernels [D, H, K],
    out kernel [H, K, D].

    Returns the attention weights as well; callers that ignore them cost nothing, since XLA
    drops unused values. Logits and softmax are float32 whatever the compute dtype.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, inputs_q: jax.Array, inputs_kv: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """inputs_q [B, Q, D], inputs_kv [B, N, D], mask [B, N] (True = attend) ->
        out [B, Q, D], weights [B, H, Q, N]."""
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads
        heads = (self.num_heads, head_dim)
        names = ("embed", "heads", "kv")
        q = Projection(heads, names, dtype=self.dtype, name="query")(inputs_q)
        k = Projection(heads, names, dtype=self.dtype, name="key")(inputs_kv)
        v = Projection(heads, names, dtype=self.dtype, name="value")(inputs_kv)

        logits = jnp.einsum("bqhk,bnhk->bhqn", q, k, preferred_element_type=jnp.float32)
        logits = logits * head_dim**-0.5
        if mask is not None:
            # The most negative float rather than -inf: a row with nothing to attend to gives
            # uniform weights instead of NaN.
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqn,bnhk->bqhk", weights.astype(v.dtype), v)
        out = Projection((width,), ("heads", "kv", "embed"), contract=2, dtype=self.dtype, name="out")(out)
        return out, weights


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). [B, N, D].

    Returns (x, None): the carry and no per-block output, the signature nn.scan needs."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        y = layer_norm(self.dtype)(x)
        y, _ = MultiHeadDotProductAttention(self.num_heads, self.dtype)(y, y)
        x = activations(x + y)
        y = layer_norm(self.dtype)(x)
        y = MlpBlock(self.mlp_dim, self.dtype)(y)
        return activations(x + y), None


class Encoder(nn.Module):
    """`depth` bidirectional blocks (no mask, as SigLIP), then the final LayerNorm. [B, N, D].

    Unscanned, the blocks are `encoderblock_{i}`; with `scan`, one `encoderblock` whose
    parameters carry a leading [depth] axis (logical name "layers"), run by `nn.scan` so that
    XLA compiles one block instead of `depth`: big_vision's two layouts, whose names
    `caip_jax.models.layout` converts between.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = Encoder1DBlock
        if self.remat_policy != "none":
            # Under scan, the loop boundary already keeps XLA from merging the recomputation
            # into the forward pass, so CSE prevention would only cost (as in big_vision).
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        if self.scan:
            block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = block(self.mlp_dim, self.num_heads, self.dtype, name="encoderblock")(x)
        else:
            for i in range(self.depth):
                x, _ = block(self.mlp_dim, self.num_heads, self.dtype, name=f"encoderblock_{i}")(x)
        return layer_norm(self.dtype, name="encoder_norm")(x)


def _attention_pool(module_dtype, num_heads, mlp_dim, queries, tokens, mask):
    """Attention from `queries` over `tokens`, then a residual MLP on the LayerNormed result.

    Called from inside a compact method, so the submodules it creates
    (MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0) belong to the caller, with
    big_vision's MAPHead names. queries [B, Q, D], tokens [B, N, D], mask [B, N] ->
    [B, Q, D], weights [B, H, Q, N].
    """
    x, weights = MultiHeadDotProductAttention(num_heads, module_dtype)(queries, tokens, mask)
    y = layer_norm(module_dtype)(x)
    return x + MlpBlock(mlp_dim, module_dtype)(y), weights


class CrossAttentionPool(nn.Module):
    """Pools `tokens` once per query: the first CAIP pooling stage, with text tokens as queries."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, queries: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """queries [B, Q, D], tokens [B, N, D], mask [B, N] -> [B, Q, D], weights [B, H, Q, N]."""
        return _attention_pool(self.dtype, self.num_heads, self.mlp_dim, queries, tokens, mask)


class MAPHead(nn.Module):
    """Multihead attention pooling with one learned probe as the query (big_vision's MAPHead)."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens [B, N, D], mask [B, N] -> [B, D], weights [B, H, N]."""
        batch, _, width = tokens.shape
        probe = self.param(
            "probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"), (1, 1, width)
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
        x, weights = _attention_pool(self.dtype, self.num_heads, self.mlp_dim, probe, tokens, mask)
        return x[:, 0], weights[:, :, 0]
