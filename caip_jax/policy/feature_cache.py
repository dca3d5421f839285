"""Frozen features of every demonstration frame, computed once per encoder and dataset and kept
in an .npz (one array [n, N, D] per episode key): the encoder is frozen, so training never
needs to run it again (benchmarks/policy.py measures what that saves). The file stores the
identity of what made it (caip_jax.policy.cache): it is read back only for exactly that
encoder and those demonstrations, and written whole or not at all."""
import numpy as np
import tqdm

from caip_jax.policy import cache
from caip_jax.policy.demonstrations import Demonstration
from caip_jax.policy.encoders import FrozenEncoder

BATCH = 64  # frames per encoder call; the last batch is padded, so a jitted encoder compiles once


def episode_features(encoder: FrozenEncoder, demo: Demonstration) -> np.ndarray:
    """The features [n, N, D] of each of the n frames of `demo`."""
    n = len(demo.action)
    if encoder.needs_images and demo.frames is None:
        raise ValueError(f"{demo.key}: encoder {encoder.name} needs frames, read the demonstrations with a video_key")
    images = demo.frames.read(np.arange(n)) if encoder.needs_images else None
    parts = []
    for start in range(0, n, BATCH):
        rows = np.minimum(np.arange(start, start + BATCH), n - 1)
        parts.append(encoder.encode(None if images is None else images[rows], [demo.text] * BATCH,
                                    None if demo.env_state is None else demo.env_state[rows]))
    return np.concatenate(parts)[:n]


def cached_features(encoder: FrozenEncoder, demos: list[Demonstration], path: str, identity) -> list[np.ndarray]:
    """Per demonstration, its features: read from the .npz `path` if it was written for
    `identity` (the encoder's and the demonstrations') and holds every episode, else computed
    (with a progress bar) and written there."""
    keys = [d.key for d in demos]
    stored = cache.read_npz(path, identity)
    if stored is not None and set(keys) <= set(stored):
        return [stored[k] for k in keys]
    features = [episode_features(encoder, d) for d in tqdm.tqdm(demos, unit="episode", desc=f"features ({encoder.name})")]
    cache.write_npz(path, identity, dict(zip(keys, features)))
    return features
