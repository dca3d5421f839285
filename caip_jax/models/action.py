"""The action tower (`act/`): a small transformer over a chunk of future hand motion.

An action chunk is `action [B, T, 2, 21, 9]` (T steps; hand 0 = left, 1 = right; 21 MANO
keypoints; 3 translation deltas then the 6D rotation) with `action_mask [B, T, 2]` marking which
hand is present at each step.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caip_jax.models import common


class ActionTransformer(nn.Module):
    """action [B, T, 2, 21, 9], action_mask [B, T, 2] -> action embedding [B, out_dim].

    Each step's features are masked (a missing hand contributes zeros whatever its values), joined
    with the mask itself (so "absent" differs from "still") and embedded linearly; a learned
    [CLS] token is prepended and its final LayerNormed state is projected to `out_dim`.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    out_dim: int
    dtype: common.Dtype = jnp.float32
    remat_policy: str = "none"
    scan: bool = False  # the encoder's blocks under nn.scan (see common.Encoder)

    @nn.compact
    def __call__(self, action: jax.Array, action_mask: jax.Array) -> jax.Array:
        batch, steps = action.shape[:2]
        mask = action_mask.astype(self.dtype)
        x = action.astype(self.dtype) * mask[:, :, :, None, None]
        x = jnp.concatenate([x.reshape(batch, steps, -1), mask], axis=-1)  # [B, T, 2*21*9 + 2]
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            kernel_init=common.logical(nn.initializers.lecun_normal(), None, "embed"),
            bias_init=common.logical(nn.initializers.zeros, "embed"),
            name="embedding",
        )(x)
        pos = self.param(
            "pos_embedding",
            common.logical(nn.initializers.normal(stddev=1 / np.sqrt(self.width)), None, "length", "embed"),
            (1, steps, self.width),
        )
        cls = self.param(
            "cls", common.logical(nn.initializers.zeros, None, None, "embed"), (1, 1, self.width)
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls, x + pos.astype(self.dtype)], axis=1)  # [B, 1 + T, W]
        x = common.activations(x)
        x = common.Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan, name="Transformer"
        )(x)
        return nn.Dense(
            self.out_dim,
            dtype=self.dtype,
            kernel_init=common.logical(nn.initializers.lecun_normal(), "mlp", "embed"),
            bias_init=common.logical(nn.initializers.zeros, "embed"),
            name="head",
        )(x[:, 0])
