"""Saliency maps from CAIP's two pooling stages, and the drawing to look at them.

Stage 1 lets each of the L text tokens attend over the N = g*g patches (weights [B, H, L, N],
softmax over N); stage 2 pools the L per-token results with one probe (weights [B, H, L], zero
on pad tokens). A patch's saliency is how much of the pooled image came from it through both
stages: s[b, n] = mean_h sum_l stage2[b, h, l] * stage1[b, h, l, n], a distribution over patches.
Patches are row-major over the g x g grid, as the ViT's patch embedding flattens them.

The maths is jnp (jit-friendly); the drawing is numpy + PIL, with no plotting library.
"""
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from caip_jax import storage

# Matplotlib's 'inferno' sampled at i/8, i = 0..8 (RGB): perceptually uniform, dark to bright,
# and readable in grey scale. Linear interpolation between these anchors is close enough for display.
INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 50],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    np.float32,
)


def patch_saliency(stage1: jnp.ndarray, stage2: jnp.ndarray) -> jnp.ndarray:
    """stage1 [B, H, L, N] (softmax over N), stage2 [B, H, L] (softmax over L) -> [B, N] float32,
    each row summing to 1. A token with zero stage-2 weight (a pad) contributes nothing."""
    if stage1.ndim != 4 or stage2.shape != stage1.shape[:3]:
        raise ValueError(
            f"stage1 {stage1.shape} and stage2 {stage2.shape} should be [B, H, L, N] and [B, H, L]: "
            f"pass encode_image_text(..., return_attention=True)'s stage1_attention and stage2_attention"
        )
    per_head = jnp.einsum("bhl,bhln->bhn", stage2.astype(jnp.float32), stage1.astype(jnp.float32))
    return per_head.mean(axis=1)


def grid_size(num_patches: int) -> int:
    """g with g * g = `num_patches`, or a ValueError naming it."""
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(
            f"N={num_patches} patches do not form a square g x g grid: saliency maps assume a square "
            f"image whose side is a multiple of the patch size"
        )
    return g


def saliency_grid(weights):
    """weights [..., N] -> [..., g, g], row-major: patch r * g + c lands at [r, c]."""
    g = grid_size(weights.shape[-1])
    return weights.reshape(*weights.shape[:-1], g, g)


def upsample(grid, size: tuple[int, int]) -> np.ndarray:
    """grid [g, g] -> [H, W] float32 in [0, 1], `size` = (H, W).

    PIL's bilinear resize of a float ('F') image: pixel centres at half-integers, edges clamped,
    so each patch value sits at the centre of its pixel block. Then min-max normalised for
    display; a constant grid gives zeros.
    """
    grid = np.asarray(grid, np.float32)
    if grid.ndim != 2:
        raise ValueError(f"upsample takes one [g, g] grid, got shape {grid.shape}: index the batch first")
    height, width = size
    heat = np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), np.float32)
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def colorize(heat: np.ndarray) -> np.ndarray:
    """heat [...] in [0, 1] -> RGB float32 [..., 3] in [0, 255], interpolating `INFERNO`."""
    x = np.clip(np.asarray(heat, np.float32), 0.0, 1.0) * (len(INFERNO) - 1)
    low = np.minimum(np.floor(x).astype(np.int32), len(INFERNO) - 2)
    frac = (x - low)[..., None]
    return INFERNO[low] * (1.0 - frac) + INFERNO[low + 1] * frac


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image uint8 [H, W, 3], heat [H, W] in [0, 1] -> uint8 [H, W, 3]: the inferno-coloured
    heat blended over the image, `alpha` of colour (0 returns the image unchanged)."""
    image = np.asarray(image)
    heat = np.asarray(heat)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if heat.shape != image.shape[:2]:
        raise ValueError(
            f"heat {heat.shape} does not match the image {image.shape[:2]}: "
            f"use upsample(grid, image.shape[:2])"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(heat)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def load_frames(frames: list, size: int) -> np.ndarray:
    """Image files, JPEG bytes or PIL images -> uint8 [B, size, size, 3], resized as the model's
    input (the whole frame, bilinear: `Preprocess.image` without augmentation)."""
    load = lambda f: f if isinstance(f, Image.Image) else Image.open(io.BytesIO(f if isinstance(f, bytes) else storage.read_bytes(f)))
    return np.stack([np.asarray(load(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in frames])


def overlay_patches(image: np.ndarray, weights: np.ndarray, display: int = 256) -> np.ndarray:
    """image uint8 [S, S, 3] and its patch saliency [N] -> uint8 [display, display, 3]: the
    image resized to `display` with the upsampled saliency overlaid."""
    frame = np.asarray(Image.fromarray(np.asarray(image)).resize((display, display), Image.BILINEAR))
    return overlay(frame, upsample(saliency_grid(np.asarray(weights)), (display, display)))


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """`text` split at spaces into lines no wider than `width` pixels (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def contact_sheet(tiles: list[np.ndarray], captions: list[str], columns: int = 4, pad: int = 4) -> np.ndarray:
    """tiles: uint8 [H, W, 3] each, captions: one per tile -> uint8 [rows * (H + C) + (rows + 1) * pad,
    cols * W + (cols + 1) * pad, 3] on white, cols = min(columns, len(tiles)), rows = ceil(len / cols).
    Tile i sits at row i // cols, column i % cols, its caption (PIL's default font, wrapped to the
    tile width) in the C pixels below it; C fits the longest caption."""
    if not tiles or len(tiles) != len(captions):
        raise ValueError(f"got {len(tiles)} tiles and {len(captions)} captions: give one caption per tile")
    tiles = [np.asarray(t) for t in tiles]
    shape = tiles[0].shape
    bad = [i for i, t in enumerate(tiles) if t.shape != shape or t.dtype != np.uint8]
    if len(shape) != 3 or shape[-1] != 3 or bad:
        raise ValueError(
            f"tiles {bad or [0]} are not uint8 {shape}: every tile must be uint8 [H, W, 3] of one size"
        )
    height, width, _ = shape
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [_wrap(c, font, width, scratch) for c in captions]
    bottom = scratch.textbbox((0, 0), "Ag", font=font)[3]
    line_height = bottom + 2  # the glyphs' full extent below the anchor, plus leading
    caption = max(1, max(len(x) for x in lines)) * line_height + pad
    sheet = Image.new(
        "RGB", (cols * width + (cols + 1) * pad, rows * (height + caption) + (rows + 1) * pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for i, (tile, text) in enumerate(zip(tiles, lines)):
        x = pad + (i % cols) * (width + pad)
        y = pad + (i // cols) * (height + caption + pad)
        sheet.paste(Image.fromarray(tile), (x, y))
        for j, line in enumerate(text):
            draw.text((x, y + height + pad // 2 + j * line_height), line, fill="black", font=font)
    return np.asarray(sheet)


def save_png(array: np.ndarray, path: str) -> None:
    """Writes uint8 [H, W, 3] (or [H, W] grey) to `path` as PNG, creating its directory."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png takes uint8, got {array.dtype}: convert with overlay or np.uint8 first")
    storage.write_encoded(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def region_mass(weights: jnp.ndarray, masks) -> jnp.ndarray:
    """weights [B, N] (patch saliency), masks [B, H, W] bool -> [B]: the saliency mass on the mask,
    each patch counted by the fraction of its pixels inside (the mask average-pooled to g x g).
    H and W must be multiples of g, as they are for masks rendered at the model's image size."""
    g = grid_size(weights.shape[-1])
    batch, height, width = masks.shape
    if height % g or width % g or batch != weights.shape[0]:
        raise ValueError(
            f"masks {masks.shape} do not fit weights {weights.shape}: need the same batch and a mask "
            f"side that is a multiple of the {g} x {g} grid (render masks at the model's image size)"
        )
    blocks = jnp.asarray(masks, jnp.float32).reshape(batch, g, height // g, g, width // g)
    coverage = blocks.mean(axis=(2, 4))
    return jnp.sum(saliency_grid(jnp.asarray(weights, jnp.float32)) * coverage, axis=(1, 2))
