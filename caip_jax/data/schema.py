"""What every data source produces: an `Episode` of world-frame hand poses, camera poses, frames
and text. Everything downstream (action chunks, records, the pipeline) starts from here.

Hands: 2 hands (0 = left, 1 = right) x 21 keypoints in the MANO / OpenPose hand order:

    0 wrist
    1-4   thumb  (CMC, MCP, IP, tip)
    5-8   index  (MCP, PIP, DIP, tip)
    9-12  middle (MCP, PIP, DIP, tip)
    13-16 ring   (MCP, PIP, DIP, tip)
    17-20 little (MCP, PIP, DIP, tip)

Every source module (caip_jax/data/sources/*.py) has two functions, so that conversion can run
in parallel over episodes (in-process or on Apache Beam):

    list_episodes(input_path: str, **options) -> list[str]      # cheap: episode keys, sorted
    read_episode(input_path: str, key: str, **options) -> Episode  # raises EpisodeError

Each keypoint is an SE(3) transform (world from joint, metres). Robot data with only an
end-effector pose puts it in the wrist slot and marks the hand valid; its other keypoints repeat
the wrist pose.
"""
import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np

NUM_HANDS = 2
NUM_KEYPOINTS = 21
FEATURES_PER_KEYPOINT = 9  # an action step per keypoint: translation delta (3, metres), 6D rotation (6)
HANDS = ("left", "right")
FINGERS = ("thumb", "index", "middle", "ring", "little")
KEYPOINT_NAMES = ("wrist",) + tuple(f"{finger}_{i}" for finger in FINGERS for i in range(1, 5))
VIEWS = ("head", "wrist")


class EpisodeError(ValueError):
    """An episode that cannot be converted; the message says why. Converters count these by
    episode id and go on with the next episode."""


class Frames(Protocol):
    """Access to an episode's video frames."""

    def __len__(self) -> int: ...

    def iterate(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """Frames at sorted `indices`, one [H, W, 3] uint8 RGB array at a time, so that a long
        high-resolution episode never sits in memory whole."""
        ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at sorted `indices` -> [k, H, W, 3] uint8 RGB."""
        ...


@dataclasses.dataclass
class ArrayFrames:
    """Frames held in memory: [N, H, W, 3] uint8."""

    array: np.ndarray

    def __len__(self) -> int:
        return len(self.array)

    def iterate(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        return iter(self.array[np.asarray(indices)])

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(indices)]


@dataclasses.dataclass
class Episode:
    """One episode of one view, as a source reads it (any frame rate, world frame).

    hands [N, 2, 21, 4, 4] world-from-keypoint; hand_valid [N, 2] bool; camera [N, 4, 4]
    world-from-camera (OpenCV convention: x right, y down, z forward); frames: N frames.
    `intrinsics` [3, 3] (pixels of `frames`) is optional, for drawing keypoints on frames.
    `labels` holds optional per-episode labels for probes (for the demo world: the target
    object, the hand, the verb).
    """

    source: str
    episode_id: str
    text: str
    fps: float
    hands: np.ndarray
    hand_valid: np.ndarray
    camera: np.ndarray
    frames: Frames
    view: str = "head"
    intrinsics: np.ndarray | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        """Raises EpisodeError naming the first inconsistency (shapes, counts, rate, view)."""
        n = len(self.hands)
        expected = {
            "hands": (self.hands.shape, (n, NUM_HANDS, NUM_KEYPOINTS, 4, 4)),
            "hand_valid": (self.hand_valid.shape, (n, NUM_HANDS)),
            "camera": (self.camera.shape, (n, 4, 4)),
        }
        for name, (shape, want) in expected.items():
            if tuple(shape) != want:
                raise EpisodeError(f"{self.episode_id}: {name} has shape {tuple(shape)}, expected {want}")
        if len(self.frames) != n:
            raise EpisodeError(f"{self.episode_id}: {len(self.frames)} frames but {n} poses")
        if not (np.isfinite(self.fps) and self.fps > 0):
            raise EpisodeError(f"{self.episode_id}: fps={self.fps} is not a positive rate")
        if self.view not in VIEWS:
            raise EpisodeError(f"{self.episode_id}: view={self.view!r} is not one of {VIEWS}")
