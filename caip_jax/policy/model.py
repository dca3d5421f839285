"""The policy: a decoder-only transformer over frozen encoder features, the instruction and the
proprioceptive state, with an action head that predicts a chunk of future actions.

Token sequence, in order: the instruction (one learned embedding per instruction of the
training data), the state, the N frozen feature tokens (the pooled embedding: N = 1; patch
tokens: N patches), then T action tokens. Attention is pi0's block-causal prefix-LM mask
(`attention_mask`): the prefix (instruction, state, features) attends within itself,
bidirectionally; the action block attends to the whole prefix and to every action token, later
ones included. So step k's velocity sees the noisy actions of the whole chunk (a causal mask
hid steps > k from it, and a chunk could not be denoised as one), while the prefix never sees
the noisy actions: its keys and values are the same at every flow step (cacheable).

Why the prefix is bidirectional rather than causal: it is pi0's choice (PaliGemma's prefix
LM), and with patch features it lets every patch token be read in the light of the
instruction (which comes first) and the state, at every layer; a causal prefix would only
withhold information from the earlier tokens, buying nothing since the prefix is never
generated token by token.

`head="flow"`: the action tokens embed the noisy chunk x_t and the flow time t, and the output
is the velocity (caip_jax/policy/flow.py). `head="mse"`: the action tokens are learned queries
only and the output is the chunk itself, regressed with a mean squared error: the baseline that
averages the modes of a multimodal demonstrator.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caip_jax.models import common

HEADS = ("flow", "mse")


def _dense(features: int, dtype, names=(None, "embed"), name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=common.logical(nn.initializers.lecun_normal(), *names),
        bias_init=common.logical(nn.initializers.zeros, names[-1]),
        name=name,
    )


def attention_mask(prefix: int, actions: int) -> np.ndarray:
    """[L, L] bool, L = prefix + actions, True where query i may attend to key j: prefix
    queries see the prefix only, action queries see everything (pi0's block-causal mask)."""
    length = prefix + actions
    query, key = np.arange(length)[:, None], np.arange(length)[None]
    return (key < prefix) | (query >= prefix)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention under a fixed mask [L, L] (True = attend): [B, L, D] ->
    [B, L, D]. The projections are common.Projection's (kernels [D, H, K] and [H, K, D]);
    logits and softmax in float32."""

    num_heads: int
    dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        width = x.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        names = ("embed", "heads", "kv")
        q, k, v = (common.Projection(heads, names, dtype=self.dtype, name=n)(x) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhk,bnhk->bhqn", q, k, preferred_element_type=jnp.float32) * heads[1] ** -0.5
        weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
        out = jnp.einsum("bhqn,bnhk->bqhk", weights.astype(v.dtype), v)
        return common.Projection((width,), ("heads", "kv", "embed"), contract=2, dtype=self.dtype, name="out")(out)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + mlp(LN(x)). [B, L, D] -> ([B, L, D],
    None), the carry and no per-block output, the signature nn.scan needs."""

    mlp_dim: int
    num_heads: int
    dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        x = common.activations(x + MaskedSelfAttention(self.num_heads, self.dtype)(common.layer_norm(self.dtype)(x), mask))
        return common.activations(x + common.MlpBlock(self.mlp_dim, self.dtype)(common.layer_norm(self.dtype)(x))), None


def _blocks(depth: int, mlp_dim: int, num_heads: int, dtype, remat_policy: str, scan: bool):
    """The decoder's blocks as a callable (x, mask) -> x, built inside a compact method:
    `block_{i}` each, or with `scan` one `blocks` whose parameters carry a leading [depth] axis
    (logical "layers") run by nn.scan (XLA compiles one block, not `depth`); `remat_policy`
    (common.REMAT_POLICIES) recomputes each block's activations in the backward pass."""
    block = DecoderBlock
    if remat_policy != "none":
        block = nn.remat(block, policy=common.REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                          in_axes=nn.broadcast, metadata_params={nn.PARTITION_NAME: "layers"})
        module = scanned(mlp_dim, num_heads, dtype, name="blocks")
        return lambda x, mask: module(x, mask)[0]
    modules = [block(mlp_dim, num_heads, dtype, name=f"block_{i}") for i in range(depth)]

    def run(x, mask):
        for module in modules:
            x = module(x, mask)[0]
        return x

    return run


def time_embedding(t: jax.Array, width: int) -> jax.Array:
    """Sinusoidal embedding of flow times t [B] in [0, 1] -> [B, width] (transformer
    positional frequencies over t * 1000, as diffusion models embed their time)."""
    half = width // 2
    frequencies = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = 1000.0 * t[:, None] * frequencies[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Policy(nn.Module):
    """(features [B, N, F], state [B, S], instruction [B] int, chunk [B, T, A], t [B]) ->
    [B, T, A]: the velocity at (chunk = x_t, t) with the flow head, the predicted chunk with
    the mse head (which ignores `chunk` and `t`)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_instructions: int
    head: str = "flow"
    dtype: common.Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, features, state, instruction, chunk, t):
        batch, steps, action_dim = chunk.shape
        w, dtype = self.width, self.dtype
        instruction = nn.Embed(
            self.num_instructions, w, embedding_init=common.logical(nn.initializers.normal(0.02), None, "embed"),
            name="instruction",
        )(instruction)[:, None]
        state = _dense(w, dtype, name="state")(state)[:, None]
        tokens = _dense(w, dtype, name="features")(features)
        position = lambda name, n: self.param(
            name, common.logical(nn.initializers.normal(stddev=1 / np.sqrt(w)), None, "length", "embed"), (1, n, w)
        )
        tokens = tokens + position("feature_positions", tokens.shape[1])
        actions = jnp.broadcast_to(position("action_positions", steps), (batch, steps, w))
        if self.head == "flow":
            times = _dense(w, dtype, name="time_in")(time_embedding(t, w))
            times = _dense(w, dtype, ("mlp", "embed"), name="time_out")(nn.swish(times))
            actions = actions + _dense(w, dtype, name="action_in")(chunk) + times[:, None]
        x = jnp.concatenate([instruction.astype(dtype), state, tokens, actions.astype(dtype)], axis=1)
        mask = jnp.asarray(attention_mask(x.shape[1] - steps, steps))
        x = _blocks(self.depth, self.mlp_dim, self.num_heads, dtype, self.remat_policy, self.scan)(x, mask)
        x = common.layer_norm(dtype, name="final_norm")(x[:, -steps:])
        return _dense(action_dim, jnp.float32, ("embed", None), name="action_out")(x).astype(jnp.float32)
