"""Streaming and merged action statistics against numpy over all unmasked entries at once."""
import json

import numpy as np
import pytest

from caip_jax.data.stats import SHAPE, RunningStats


def chunks(seed, count=9, steps=5):
    """(action, mask) pairs, batched [B, T, 2, 21, 9] or not [T, 2, 21, 9], float32 like the
    records, each dimension with its own offset and spread, masked entries NaN."""
    rng = np.random.default_rng(seed)
    offset, spread = rng.uniform(-100, 100, SHAPE), rng.uniform(0.01, 3, SHAPE)
    out = []
    for i in range(count):
        lead = () if i % 3 == 0 else (int(rng.integers(1, 4)),)
        action = (offset + spread * rng.normal(size=lead + (steps,) + SHAPE)).astype(np.float32)
        mask = rng.random(lead + (steps, 2)) > 0.3
        action[~mask] = np.nan
        out.append((action, mask))
    return out


def reference(pairs):
    """count, numpy mean and std per dimension, selecting each hand's unmasked steps directly."""
    values = np.concatenate([a.reshape((-1,) + SHAPE) for a, _ in pairs]).astype(np.float64)
    keep = np.concatenate([m.reshape(-1, 2) for _, m in pairs])
    count, mean, std = np.zeros(SHAPE, int), np.zeros(SHAPE), np.ones(SHAPE)
    for hand in range(2):
        selected = values[keep[:, hand], hand]  # [n, 21, 9]
        count[hand] = len(selected)
        if len(selected):
            mean[hand], std[hand] = selected.mean(0), selected.std(0)
    return count, mean, std


def assert_matches(stats, pairs):
    count, mean, std = reference(pairs)
    np.testing.assert_array_equal(stats.count, count)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(stats.std, std, rtol=1e-9)


def test_streaming_equals_numpy_over_all_unmasked_entries():
    pairs = chunks(0)
    stats = RunningStats()
    for action, mask in pairs:
        stats.update(action, mask)
    assert_matches(stats, pairs)
    assert np.isfinite(stats.m2).all()  # the NaNs under the mask never got in


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merging_workers_in_any_split_and_order_equals_numpy(seed):
    pairs = chunks(seed)
    rng = np.random.default_rng(seed)
    worker = rng.integers(0, 4, len(pairs))  # some workers may get nothing
    parts = []
    for w in range(4):
        part = RunningStats()
        for i in np.flatnonzero(worker == w):
            part.update(*pairs[i])
        parts.append(part)
    total = RunningStats()
    for i in rng.permutation(4):
        total = total.merge(parts[i])
    assert_matches(total, pairs)
    tree = parts[3].merge(parts[1]).merge(parts[0].merge(parts[2]))
    assert_matches(tree, pairs)


def test_a_dimension_never_seen_has_count_0_mean_0_std_1():
    pairs = chunks(4)
    for _, mask in pairs:
        mask[..., 1] = False  # the right hand is never there
    stats = RunningStats()
    for action, mask in pairs:
        stats.update(np.where(mask[..., None, None], action, np.nan), mask)
    np.testing.assert_array_equal(stats.count[1], 0)
    np.testing.assert_array_equal(stats.mean[1], 0)
    np.testing.assert_array_equal(stats.std[1], 1)
    assert_matches(stats, pairs)
    np.testing.assert_array_equal(RunningStats().std, np.ones(SHAPE))


def test_json_round_trip_is_exact():
    stats = RunningStats()
    for action, mask in chunks(5):
        stats.update(action, mask)
    content = json.loads(json.dumps(stats.to_json()))
    assert isinstance(content["count"][0][0][0], int)
    np.testing.assert_array_equal(content["std"], stats.std)
    back = RunningStats.from_json(content)
    for name in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
        assert getattr(back, name).dtype == getattr(stats, name).dtype
