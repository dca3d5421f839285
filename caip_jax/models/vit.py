"""The SigLIP 2 image tower (`img/`): patch stem, learned positions, encoder, MAP head."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from caip_jax.models import common

# Tower sizes by big_vision's variant names: width, depth, MLP width, heads.
SIZES = {
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """'L/16' -> dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16)."""
    match = re.fullmatch(r"([A-Za-z0-9]+)/(\d+)", str(variant))
    if match is None or match.group(1) not in SIZES:
        raise ValueError(
            f"model.variant={variant!r} is not a known variant: use SIZE/PATCH with SIZE one of "
            f"{sorted(SIZES)} (for example 'L/16')"
        )
    return dict(SIZES[match.group(1)], patch_size=int(match.group(2)))


class ViT(nn.Module):
    """images [B, H, W, 3] in [-1, 1] -> patch tokens [B, N, D] (after the final LayerNorm) and
    the MAP head's pooled embedding [B, D]; N = (H / patch) * (W / patch)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    dtype: common.Dtype = jnp.float32
    remat_policy: str = "none"
    scan: bool = False  # the encoder's blocks under nn.scan (see common.Encoder)

    @nn.compact
    def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.patch_size
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=common.logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
            bias_init=common.logical(nn.initializers.zeros, "embed"),
            name="embedding",
        )(image.astype(self.dtype))
        batch, h, w, d = x.shape
        x = jnp.reshape(x, (batch, h * w, d))  # row-major over the patch grid
        pos = self.param(
            "pos_embedding",
            common.logical(nn.initializers.normal(stddev=1 / np.sqrt(d)), None, "length", "embed"),
            (1, h * w, d),
        )
        x = common.activations(x + pos.astype(self.dtype))
        x = common.Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan, name="Transformer"
        )(x)
        pooled, _ = common.MAPHead(self.num_heads, self.mlp_dim, self.dtype)(x)
        return x, pooled
