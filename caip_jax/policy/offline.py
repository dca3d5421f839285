"""Offline judgement for robot data with no simulator: the policy's action error on held-out
episodes, per step of the predicted chunk (the paper's real-robot tasks cannot be simulated)."""
import jax
import numpy as np

from caip_jax.policy.dataset import TrainingSet
from caip_jax.policy import train
from caip_jax.policy.train import TrainedPolicy

BATCH = 256


def split_episodes(count: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Episode positions -> (train, held-out): the last round(held_out * count) episodes (at
    least one) are held out, so that a dataset recorded in sessions holds out whole sessions."""
    if count < 2:
        raise ValueError(f"{count} episode(s): offline evaluation needs at least 2 (one to hold out)")
    test = min(count - 1, max(1, round(held_out * count)))
    return np.arange(count - test), np.arange(count - test, count)


def action_error(policy: TrainedPolicy, data: TrainingSet, seed: int = 0) -> dict:
    """Mean squared error (in the data's action units, averaged over action dimensions) between
    a sampled chunk and the demonstrated one: overall and per chunk step k = 1..T, over the
    rows whose step k is inside the episode."""
    squared, counts = np.zeros(policy.config.horizon), np.zeros(policy.config.horizon)
    key = train.key(seed)
    for start in range(0, len(data), BATCH):
        rows = np.minimum(np.arange(start, start + BATCH), len(data) - 1)  # one compiled shape
        keep = np.arange(start, start + BATCH) < len(data)
        predicted = policy.act(data.features[rows], data.state[rows], data.instruction[rows], jax.random.fold_in(key, start))
        error = ((predicted - data.chunk[rows]) ** 2).mean(axis=-1)  # [B, T]
        mask = data.chunk_mask[rows] & keep[:, None]
        squared += (error * mask).sum(axis=0)
        counts += mask.sum(axis=0)
    return dict(mse=float(squared.sum() / counts.sum()), mse_by_step=(squared / np.maximum(counts, 1)).tolist(),
                rows=len(data))
