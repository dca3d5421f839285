"""The part of preprocessing that runs inside the jitted step, on the accelerator: colour jitter
and scaling of the uint8 images, and action chunks from the stored pose offsets, normalised.

The host pipeline (data/pipeline.py) only decodes, crops and tokenises, and draws the jitter
factors: the dense per-pixel and per-joint arithmetic costs the accelerator almost nothing and
would otherwise halve the samples a host CPU delivers.
"""
import jax
import jax.numpy as jnp

from caip_jax import actions

POSE_KEYS = ("translation", "translation_scale", "rotation")


def color_jitter(image: jax.Array, factors: jax.Array) -> jax.Array:
    """uint8 images [B, H, W, 3] and factors [B, 3] (brightness, contrast, saturation; 1 = no
    change) -> float32 in [-1, 1]. PIL ImageEnhance's semantics, in float: brightness scales,
    contrast blends with the mean grey, saturation with the greyscale image, each clipped."""
    x = image.astype(jnp.float32) / 255.0
    brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
    grey = lambda y: jnp.sum(y * jnp.array([0.299, 0.587, 0.114]), axis=-1, keepdims=True)  # ITU-R 601, as PIL "L"
    x = jnp.clip(x * brightness, 0.0, 1.0)
    mean = jnp.mean(grey(x), axis=(1, 2, 3), keepdims=True)
    x = jnp.clip((x - mean) * contrast + mean, 0.0, 1.0)
    x = jnp.clip((x - grey(x)) * saturation + grey(x), 0.0, 1.0)
    return x * 2.0 - 1.0


def action_chunks(batch: dict, horizon: int, delta: str, mean: jax.Array, std: jax.Array):
    """Batch of stored offsets -> (action [B, T, 2, 21, 9] normalised, action_mask [B, T, 2]).
    mean, std: [S, 2, 21, 9], one row per source of the mixture, picked by `source_index`."""
    packed = {k: batch[k] for k in POSE_KEYS}
    chunk = lambda p, v: actions.compressed_action_chunk(p, v, horizon, delta, xp=jnp)
    action, mask = jax.vmap(chunk)(packed, batch["valid"])
    source = batch["source_index"]
    mean, std = jnp.asarray(mean)[source][:, None], jnp.asarray(std)[source][:, None]  # [B, 1, 2, 21, 9]
    return actions.normalize(action, mask, mean, std, xp=jnp), mask
