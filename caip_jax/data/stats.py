"""Streaming per-dimension statistics of action chunks, for normalising actions (stats.json).

Each of the 2 x 21 x 9 action dimensions keeps count, mean and M2 (the sum of squared deviations
from the mean) over its unmasked entries. A batch is reduced exactly (two passes over it), and
statistics combine with the parallel update of Chan, Golub and LeVeque (1979), so workers can
each stream a shard and merge at the end, in any order, to the result of one pass over all data
(up to rounding).

A dimension with no unmasked entries has count 0, mean 0 and std 1, so that normalising it is
the identity; its entries are masked wherever they occur anyway.
"""
import dataclasses

import numpy as np

from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS

SHAPE = (NUM_HANDS, NUM_KEYPOINTS, FEATURES_PER_KEYPOINT)


@dataclasses.dataclass
class RunningStats:
    """count int64, mean and m2 float64, each [2, 21, 9]. `RunningStats()` has seen nothing."""

    count: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(SHAPE, np.int64))
    mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(SHAPE, np.float64))
    m2: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(SHAPE, np.float64))

    @classmethod
    def of_batch(cls, action: np.ndarray, mask: np.ndarray) -> "RunningStats":
        """action [..., T, 2, 21, 9], mask [..., T, 2] -> statistics of the unmasked entries."""
        action = np.asarray(action, np.float64)
        keep = np.broadcast_to(np.asarray(mask, bool)[..., None, None], action.shape)
        action, keep = action.reshape((-1,) + SHAPE), keep.reshape((-1,) + SHAPE)
        count = keep.sum(0)
        mean = np.where(keep, action, 0).sum(0) / np.maximum(count, 1)
        m2 = np.where(keep, (action - mean) ** 2, 0).sum(0)
        return cls(count, mean, m2)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """The statistics of the entries of both, as a new RunningStats (Chan et al.)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        share = other.count / np.maximum(count, 1)  # other's fraction of the merged entries
        return RunningStats(
            count, self.mean + delta * share, self.m2 + other.m2 + delta**2 * self.count * share
        )

    def update(self, action: np.ndarray, mask: np.ndarray) -> None:
        """Adds a batch (see `of_batch`) in place."""
        merged = self.merge(RunningStats.of_batch(action, mask))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0) [2, 21, 9]; 1 where count is 0."""
        return np.where(self.count > 0, np.sqrt(self.m2 / np.maximum(self.count, 1)), 1.0)

    def to_json(self) -> dict:
        """Plain dict of nested lists: count, mean, m2, and std for readers that only normalise."""
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_json(cls, content: dict) -> "RunningStats":
        """The inverse of `to_json` (std is derived, so it is not read)."""
        return cls(
            np.asarray(content["count"], np.int64),
            np.asarray(content["mean"], np.float64),
            np.asarray(content["m2"], np.float64),
        )
