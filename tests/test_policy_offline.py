"""Offline judgement: held-out action error per chunk step, against a brute-force loop over
rows; episode splits hold out the last episodes."""
import jax
import numpy as np
import pytest

from caip_jax.policy import config as policy_config
from caip_jax.policy import offline, train
from caip_jax.policy.dataset import TrainingSet, action_chunks

LENGTHS = (7, 3, 12)  # episodes shorter than the horizon too: their chunks are padded


def synthetic(seed: int) -> TrainingSet:
    rng = np.random.default_rng(seed)
    features = [rng.standard_normal((n, 2, 5)) for n in LENGTHS]
    states = [rng.standard_normal((n, 3)) for n in LENGTHS]
    actions = [rng.standard_normal((n, 2)) for n in LENGTHS]
    return TrainingSet.build(features, states, actions, ["a", "b", "a"], horizon=4)


def test_action_chunks_pad_past_the_end():
    actions = np.arange(6.0).reshape(3, 2)
    chunks, mask = action_chunks(actions, 4)
    np.testing.assert_array_equal(chunks[1], [[2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])


def test_action_error_is_the_brute_force_loop(tmp_path):
    data = synthetic(0)
    config = policy_config.policy_config("tiny")
    config.model.head = "mse"  # deterministic predictions: the loop below can recompute them
    config.horizon, config.execute, config.total_steps, config.batch_size = 4, 2, 5, 8
    policy = train.train(config, data, str(tmp_path), devices=jax.devices()[:1])
    scored = offline.action_error(policy, data)
    squared, counts = np.zeros(4), np.zeros(4)
    for r in range(len(data)):
        predicted = policy.act(data.features[r:r + 1], data.state[r:r + 1], data.instruction[r:r + 1], train.key(0))[0]
        for k in range(4):
            if data.chunk_mask[r, k]:
                squared[k] += np.mean((predicted[k] - data.chunk[r, k]) ** 2)
                counts[k] += 1
    np.testing.assert_allclose(scored["mse_by_step"], squared / counts, rtol=1e-5)
    np.testing.assert_allclose(scored["mse"], squared.sum() / counts.sum(), rtol=1e-5)
    assert scored["rows"] == sum(LENGTHS) and counts[3] < counts[0]  # padded steps left out


def test_split_holds_out_the_last_episodes():
    train_ids, test_ids = offline.split_episodes(10, 0.2)
    np.testing.assert_array_equal(train_ids, np.arange(8))
    np.testing.assert_array_equal(test_ids, [8, 9])
    assert len(offline.split_episodes(3, 0.01)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="1 episode"):
        offline.split_episodes(1, 0.2)
    rows = synthetic(1).episodes(np.array([2]))
    assert len(rows) == LENGTHS[2] and set(rows.episode) == {2}
