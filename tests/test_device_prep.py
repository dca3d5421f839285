"""The device half of preprocessing against independent host computations: colour jitter
against PIL's ImageEnhance, action chunks against the camera-frame poses, in numpy."""
import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from caip_jax import actions, device_prep
from caip_jax.data import pipeline, records


@pytest.mark.parametrize(
    # Per-channel value ranges. Unbalanced channels (a reddish scene) tell PIL's contrast, which
    # blends towards the mean of the greyscale image, from a blend towards each channel's own
    # mean, which misses PIL here by over 30 levels of 255.
    "low, high",
    [((0, 0, 0), (256, 256, 256)), ((150, 40, 0), (256, 160, 60))],
    ids=["balanced", "channel_unbalanced"],
)
def test_color_jitter_is_pil_image_enhance(low, high):
    rng = np.random.default_rng(0)
    images = rng.integers(low, high, (3, 24, 32, 3)).astype(np.uint8)
    factors = rng.uniform(0.8, 1.2, (3, 3)).astype(np.float32)
    factors[:, 1] = [0.5, 1.5, 0.7]  # contrast far from 1
    got = np.asarray(jax.jit(device_prep.color_jitter)(images, factors))
    for image, (b, c, s), out in zip(images, factors, got):
        pil = Image.fromarray(image)
        for enhancer, factor in ((ImageEnhance.Brightness, b), (ImageEnhance.Contrast, c), (ImageEnhance.Color, s)):
            pil = enhancer(pil).enhance(float(factor))
        # PIL rounds to uint8 after each of the three steps and takes the contrast mean as an
        # integer: a few levels of 255.
        np.testing.assert_allclose((out + 1) * 127.5, np.asarray(pil, np.float32), atol=4)
    identity = jax.jit(device_prep.color_jitter)(images, np.ones((3, 3), np.float32))
    np.testing.assert_allclose(identity, images / 127.5 - 1, atol=1e-6)


def test_action_chunks_are_the_camera_frame_chunks_normalised(record_set):
    directory, _ = record_set
    preprocess = pipeline.Preprocess(record_set[1], 16, 8, horizon=8)
    samples = [records.decode(r) for r in records.read_shard(records.shard_paths(directory)[0])[:4]]
    rows = [preprocess(records.encode(s)) for s in samples]
    batch = {k: np.stack([r[k] for r in rows]) for k in device_prep.POSE_KEYS + ("valid",)}
    batch["source_index"] = np.array([0, 1, 0, 1], np.int32)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 2, 21, 9)).astype(np.float32)
    std = rng.uniform(0.5, 2, size=(2, 2, 21, 9)).astype(np.float32)
    for delta in actions.DELTAS:
        action, mask = jax.jit(device_prep.action_chunks, static_argnums=(1, 2))(batch, 8, delta, mean, std)
        for i, sample in enumerate(samples):
            exact, exact_mask = actions.action_chunk(actions.decompress_poses(sample["poses"]), sample["valid"], delta)
            source = batch["source_index"][i]
            expected = (exact - mean[source]) / std[source] * exact_mask[..., None, None]
            np.testing.assert_array_equal(mask[i], exact_mask)
            np.testing.assert_allclose(action[i], expected, atol=2e-4)
