"""Saliency from CAIP's two pooling stages: the maths against brute force and planted truths,
the model's attention end to end, and the drawing's sizes."""
import jax
import numpy as np
import pytest
from PIL import Image

import tiny
from caip_jax.evaluate import saliency
from caip_jax.models import CAIP, model_from_config


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def random_stages(rng, b=3, h=4, length=5, n=16):
    return softmax(rng.normal(size=(b, h, length, n))), softmax(rng.normal(size=(b, h, length)))


def brute_saliency(stage1, stage2):
    b, h, length, n = stage1.shape
    out = np.zeros((b, n))
    for i in range(b):
        for p in range(n):
            out[i, p] = sum(stage2[i, k, t] * stage1[i, k, t, p] for k in range(h) for t in range(length)) / h
    return out


def test_patch_saliency_matches_brute_force_and_sums_to_one():
    stage1, stage2 = random_stages(np.random.default_rng(0))
    s = np.asarray(jax.jit(saliency.patch_saliency)(stage1.astype(np.float32), stage2.astype(np.float32)))
    np.testing.assert_allclose(s, brute_saliency(stage1, stage2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="stage1"):
        saliency.patch_saliency(stage1, stage2[:, :, :-1])


def test_a_token_with_zero_stage2_weight_does_not_count():
    rng = np.random.default_rng(1)
    stage1, stage2 = random_stages(rng)
    stage2[:, :, 2] = 0
    stage2 /= stage2.sum(-1, keepdims=True)
    other = stage1.copy()
    other[:, :, 2] = softmax(5 * rng.normal(size=other[:, :, 2].shape))
    np.testing.assert_allclose(
        saliency.patch_saliency(stage1, stage2), saliency.patch_saliency(other, stage2), rtol=1e-6
    )
    # The same change to a weighted token does move the map.
    other = stage1.copy()
    other[:, :, 1] = softmax(5 * rng.normal(size=other[:, :, 1].shape))
    assert not np.allclose(saliency.patch_saliency(stage1, stage2), saliency.patch_saliency(other, stage2))


def test_saliency_of_a_tiny_model_masks_pads_and_sums_to_one():
    config = tiny.tiny_model_config()
    model = model_from_config(config)
    rng = np.random.default_rng(0)
    b, g = 3, tiny.IMAGE_SIZE // tiny.PATCH
    image = rng.uniform(-1, 1, (b, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3)).astype(np.float32)
    text = rng.integers(1, tiny.VOCAB, (b, tiny.TEXT_LEN)).astype(np.int32)
    text[0, 4:] = text[1, 9:] = config.text.pad_id

    @jax.jit
    def maps(image, text):
        # Only the image and text towers and the pooling: the action tower plays no part here.
        variables = model.init(jax.random.key(0), image, text, method=CAIP.encode_image_text)
        out = model.apply(variables, image, text, return_attention=True, method=CAIP.encode_image_text)
        weights = saliency.patch_saliency(out["stage1_attention"], out["stage2_attention"])
        return out["stage1_attention"], out["stage2_attention"], weights

    stage1, stage2, weights = map(np.asarray, maps(image, text))
    pad = np.broadcast_to((text == config.text.pad_id)[:, None], stage2.shape)
    assert pad.any() and np.all(stage2[pad] == 0) and np.all(stage2[~pad] > 0)
    assert weights.shape == (b, g * g)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(weights, brute_saliency(stage1, stage2), rtol=1e-4, atol=1e-7)


def brute_region_mass(weights, masks):
    b, n = weights.shape
    g = round(n**0.5)
    ph, pw = masks.shape[1] // g, masks.shape[2] // g
    out = np.zeros(b)
    for i in range(b):
        for p in range(n):
            r, c = divmod(p, g)
            inside = masks[i, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].sum()
            out[i] += weights[i, p] * inside / (ph * pw)
    return out


def test_region_mass_on_planted_masks():
    rng = np.random.default_rng(2)
    g, ph, pw = 4, 8, 6  # non-square patches catch a swapped height and width
    weights = softmax(rng.normal(size=(2, g * g)))
    masks = np.zeros((2, g * ph, g * pw), bool)
    masks[0, 1 * ph : 2 * ph, 3 * pw : 4 * pw] = True  # exactly patch (1, 3)
    masks[1, 2 * ph : 3 * ph, 0 : pw // 2] = True  # the left half of patch (2, 0)
    mass = np.asarray(saliency.region_mass(weights, masks))
    np.testing.assert_allclose(mass, [weights[0, 1 * g + 3], 0.5 * weights[1, 2 * g + 0]], rtol=1e-6)

    random = rng.random(masks.shape) < 0.3
    np.testing.assert_allclose(saliency.region_mass(weights, random), brute_region_mass(weights, random), rtol=1e-5)
    np.testing.assert_allclose(saliency.region_mass(weights, np.ones_like(masks)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        saliency.region_mass(weights, masks[:, :-1])


@pytest.mark.parametrize("r, c", [(0, 3), (2, 1)])
def test_grid_is_row_major_and_upsampled_peak_stays_in_its_block(r, c):
    g, height, width = 4, 32, 48
    weights = np.zeros((1, g * g), np.float32)
    weights[0, r * g + c] = 1
    grid = np.asarray(saliency.saliency_grid(weights))
    assert grid.shape == (1, g, g) and grid[0, r, c] == 1 and grid.sum() == 1
    heat = saliency.upsample(grid[0], (height, width))
    assert heat.shape == (height, width) and heat.min() == 0 and heat.max() == 1
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert (y // (height // g), x // (width // g)) == (r, c)
    with pytest.raises(ValueError, match="N=15"):
        saliency.saliency_grid(np.zeros((1, 15)))


def test_upsample_is_bilinear_with_half_pixel_centres():
    # Columns of a 2x2 ramp sit at x = 1 and 3 of 4 output pixels (centres 0.5 + i): outputs at
    # 0.5, 1.5, 2.5, 3.5 read 0 (clamped), 1/4, 3/4, 1 (clamped).
    heat = saliency.upsample(np.array([[0.0, 1.0], [0.0, 1.0]]), (4, 4))
    np.testing.assert_allclose(heat, np.tile([0, 0.25, 0.75, 1], (4, 1)), atol=1e-6)


def test_overlay_sizes_alpha_and_a_brightening_colormap():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    heat = rng.random((20, 30))
    out = saliency.overlay(image, heat)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    np.testing.assert_array_equal(saliency.overlay(image, heat, alpha=0.0), image)
    # alpha=1 shows the colour alone: heat 0 and 1 are inferno's ends, black-purple and pale yellow.
    ends = saliency.overlay(image[:1, :2], np.array([[0.0, 1.0]]), alpha=1.0)[0]
    np.testing.assert_array_equal(ends, [[0, 0, 4], [252, 255, 164]])
    # Perceptual: luminance rises with heat, so the map reads the same in grey scale.
    luma = saliency.colorize(np.linspace(0, 1, 101)) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) > 0)
    with pytest.raises(ValueError, match="upsample"):
        saliency.overlay(image, heat[:-1])


def test_contact_sheet_layout_and_png(tmp_path):
    h, w, pad, columns = 24, 40, 4, 4
    tiles = [np.full((h, w, 3), 40 * (i + 1), np.uint8) for i in range(5)]
    captions = ["pick up the cup and put it in the bowl", "", "a", "b", "c"]
    sheet = saliency.contact_sheet(tiles, captions, columns=columns, pad=pad)
    rows, cols = 2, 4
    assert sheet.dtype == np.uint8 and sheet.shape[1:] == (cols * w + (cols + 1) * pad, 3)
    caption = (sheet.shape[0] - rows * h - (rows + 1) * pad) / rows
    assert caption == int(caption) and caption > 0
    caption = int(caption)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // cols) * (h + caption + pad), pad + (i % cols) * (w + pad)
        np.testing.assert_array_equal(sheet[y : y + h, x : x + w], tile)
        strip = sheet[y + h : y + h + caption, x : x + w]
        assert (strip.min() < 128) == bool(captions[i]), i  # text drawn exactly where there is a caption
    # The long caption wraps: it has ink on more than one text line.
    long_strip = sheet[pad + h : pad + h + caption, pad : pad + w].min(axis=(1, 2)) < 128
    assert caption > 12 and long_strip[caption // 2 :].any()
    with pytest.raises(ValueError, match="one caption per tile"):
        saliency.contact_sheet(tiles, captions[:-1])

    path = tmp_path / "sheets" / "sheet.png"
    saliency.save_png(sheet, str(path))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), sheet)
