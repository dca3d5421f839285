"""CAIP: image, text and action towers, text-conditioned pooling, and the loss scalars.

Parameter tree: `img/` (SigLIP 2 ViT), `txt/` (SigLIP 2 text tower), `act/` (action tower),
`pool/` (two-stage pooling), `t` (log temperature) and `b` (bias) of the sigmoid loss.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from caip_jax.models import common
from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from caip_jax.models.action import ActionTransformer
from caip_jax.models.text import TextTransformer
from caip_jax.models.vit import ViT, decode_variant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TextConditionedPool(nn.Module):
    """Two attention pools: each text token queries the patches (`CrossAttentionPool_0`), then one
    learned probe pools those per-token results, padded text positions masked out (`MAPHead_0`)."""

    num_heads: int
    mlp_dim: int
    dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, text_tokens, text_mask):
        """patches [B, N, D], text_tokens [B, L, D], text_mask [B, L] (True = real token) ->
        pooled [B, D], stage-1 weights [B, H, L, N], stage-2 weights [B, H, L]."""
        per_token, stage1 = common.CrossAttentionPool(self.num_heads, self.mlp_dim, self.dtype)(
            text_tokens, patches
        )
        pooled, stage2 = common.MAPHead(self.num_heads, self.mlp_dim, self.dtype)(per_token, text_mask)
        return pooled, stage1, stage2


class CAIP(nn.Module):
    """The CAIP model. Build it from a config with `model_from_config`."""

    img: ViT
    txt: TextTransformer
    act: ActionTransformer
    pool: TextConditionedPool
    pad_id: int = 0
    t_init: float = math.log(10.0)
    b_init: float = -10.0

    def setup(self):
        self.t = self.param("t", common.logical(nn.initializers.constant(self.t_init)), ())
        self.b = self.param("b", common.logical(nn.initializers.constant(self.b_init)), ())

    def encode_image_text(self, image, text, return_attention=False):
        """image [B, H, W, 3] in [-1, 1], text [B, L] int ids (pad = `pad_id`) -> dict:
        image_pooled [B, D], patch_features [B, N, D], text_tokens [B, L, D], text_pooled [B, D],
        image_map [B, D] (the image tower's own MAP head); with `return_attention`, also
        stage1_attention [B, H, L, N] and stage2_attention [B, H, L] of the pooling."""
        patch_features, image_map = self.img(image)
        text_tokens, text_pooled = self.txt(text)
        image_pooled, stage1, stage2 = self.pool(patch_features, text_tokens, text != self.pad_id)
        out = dict(
            image_pooled=image_pooled,
            patch_features=patch_features,
            text_tokens=text_tokens,
            text_pooled=text_pooled,
            image_map=image_map,
        )
        if return_attention:
            out.update(stage1_attention=stage1, stage2_attention=stage2)
        return out

    def encode_action(self, action, action_mask):
        """action [B, T, 2, 21, 9], action_mask [B, T, 2] -> action_embedding [B, D]."""
        return self.act(action, action_mask)

    def __call__(self, image, text, action, action_mask, return_attention=False):
        """All of `encode_image_text`'s outputs plus `action_embedding` [B, D]."""
        out = self.encode_image_text(image, text, return_attention)
        out["action_embedding"] = self.encode_action(action, action_mask)
        return out


def tower_size(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The image/text tower size: the variant's, with any explicit `model.width`, `model.depth`,
    `model.mlp_dim` or `model.num_heads` taking precedence."""
    size = decode_variant(config.variant)
    for field in ("width", "depth", "mlp_dim", "num_heads"):
        if config.get(field) is not None:
            size[field] = config[field]
    return size


def _require(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def validate(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Checks `config` (the `model` part of a run config); returns the tower size. Every error
    names the offending field and what would fix it."""
    size = tower_size(config)
    p = size["patch_size"]
    _require(
        config.image_size > 0 and config.image_size % p == 0,
        f"model.image_size={config.image_size} is not a positive multiple of the patch size {p} "
        f"(from model.variant={config.variant!r}): use for example {max(p, config.image_size // p * p)}",
    )
    for prefix, cfg in (("model", size), ("model.action", config.action)):
        _require(
            cfg["width"] % cfg["num_heads"] == 0,
            f"{prefix}.width={cfg['width']} is not divisible by {prefix}.num_heads={cfg['num_heads']}: "
            f"choose a width that is a multiple of the head count",
        )
    pool_heads = config.pool.num_heads or size["num_heads"]
    _require(
        size["width"] % pool_heads == 0,
        f"model.pool.num_heads={pool_heads} does not divide the tower width {size['width']}",
    )
    _require(
        config.dtype in DTYPES,
        f"model.dtype={config.dtype!r} is not one of {sorted(DTYPES)}",
    )
    _require(
        config.remat_policy in common.REMAT_POLICIES,
        f"model.remat_policy={config.remat_policy!r} is not one of {sorted(common.REMAT_POLICIES)}",
    )
    for field, value in (
        ("text.length", config.text.length),
        ("text.vocab_size", config.text.vocab_size),
        ("action.horizon", config.action.horizon),
    ):
        _require(value > 0, f"model.{field}={value} must be positive")
    return size


def model_from_config(config: ml_collections.ConfigDict) -> CAIP:
    """The CAIP module described by `config` (the `model` part of a run config)."""
    size = validate(config)
    # Run configs saved before model.scan existed describe per-block models.
    encoder = dict(dtype=DTYPES[config.dtype], remat_policy=config.remat_policy, scan=config.get("scan", False))
    tower = dict(**{k: size[k] for k in ("width", "depth", "mlp_dim", "num_heads")}, **encoder)
    act = config.action
    return CAIP(
        img=ViT(patch_size=size["patch_size"], **tower),
        txt=TextTransformer(vocab_size=config.text.vocab_size, out_dim=size["width"], **tower),
        act=ActionTransformer(
            width=act.width,
            depth=act.depth,
            mlp_dim=act.mlp_dim,
            num_heads=act.num_heads,
            out_dim=size["width"],
            **encoder,
        ),
        pool=TextConditionedPool(
            num_heads=config.pool.num_heads or size["num_heads"],
            mlp_dim=config.pool.mlp_dim or size["mlp_dim"],
            dtype=encoder["dtype"],
        ),
        pad_id=config.text.pad_id,
        t_init=config.t_init,
        b_init=config.b_init,
    )


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of the shapes `config` expects, for `init` and `jax.eval_shape`."""
    s, t = config.image_size, config.action.horizon
    return dict(
        image=jnp.zeros((batch, s, s, 3), jnp.float32),
        text=jnp.zeros((batch, config.text.length), jnp.int32),
        action=jnp.zeros((batch, t, NUM_HANDS, NUM_KEYPOINTS, FEATURES_PER_KEYPOINT), jnp.float32),
        action_mask=jnp.ones((batch, t, NUM_HANDS), jnp.bool_),
    )
