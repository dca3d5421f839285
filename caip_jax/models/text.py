"""The SigLIP 2 text tower (`txt/`): token + position embedding, encoder, head on the last token."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caip_jax.models import common


class TextTransformer(nn.Module):
    """text ids [B, L] -> tokens [B, L, D] (after the final LayerNorm) and the pooled text
    embedding [B, out_dim].

    As in SigLIP 2, attention sees every position (no padding mask) and pooling takes the LAST
    position, which after 64-token padding is usually a pad token: that is how the released
    weights were trained, so masking here would change their outputs.
    """

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    out_dim: int
    dtype: common.Dtype = jnp.float32
    remat_policy: str = "none"
    scan: bool = False  # the encoder's blocks under nn.scan (see common.Encoder)

    @nn.compact
    def __call__(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=common.logical(nn.initializers.normal(stddev=1.0), "vocab", "embed"),
        )(text)
        _, length, d = x.shape
        pos = self.param(
            "pos_embedding",
            common.logical(nn.initializers.normal(stddev=1 / np.sqrt(d)), None, "length", "embed"),
            (1, length, d),
        )
        x = common.activations(x + pos.astype(self.dtype))
        x = common.Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan)(x)
        pooled = nn.Dense(
            self.out_dim,
            dtype=self.dtype,
            kernel_init=common.logical(nn.initializers.lecun_normal(), "embed", "mlp"),
            bias_init=common.logical(nn.initializers.zeros, "mlp"),
            name="head",
        )(x[:, -1])
        return x, pooled
