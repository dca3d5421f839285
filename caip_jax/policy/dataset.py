"""What a policy trains on: one row per demonstration frame, with the frame's cached frozen
features, its proprioceptive state, its instruction and the chunk of actions that follows it.

Chunks: for frame i of an episode of n frames the chunk is actions[i : i + T]; past the end the
last action repeats and `chunk_mask` is false, so padding never counts in the loss.
"""
import dataclasses

import numpy as np


def action_chunks(actions: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """actions [n, A] of one episode -> chunks [n, T, A], chunk_mask [n, T] (T = horizon)."""
    n = len(actions)
    index = np.arange(n)[:, None] + np.arange(horizon)[None]
    return actions[np.minimum(index, n - 1)], index < n


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-dimension mean and std [D]; a constant dimension gets std 1 (it normalises to 0)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, mask: np.ndarray | None = None) -> "Normalizer":
        """values [..., D]; mask [...] (true rows count)."""
        rows = values.reshape(-1, values.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1)]
        std = rows.std(axis=0)
        return cls(rows.mean(axis=0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32))

    def normalize(self, x):
        return (x - self.mean) / self.std

    def denormalize(self, x):
        return x * self.std + self.mean

    def to_json(self) -> dict:
        return dict(mean=self.mean.tolist(), std=self.std.tolist())

    @classmethod
    def from_json(cls, d: dict) -> "Normalizer":
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclasses.dataclass
class TrainingSet:
    """Rows of demonstration frames (F of them, all episodes back to back):

    features [F, N, D] frozen encoder tokens; state [F, S] proprioception; instruction [F] int
    (index into `instructions`); chunk [F, T, A] actions from the frame on; chunk_mask [F, T];
    episode [F] the episode's position in the demonstrations."""

    features: np.ndarray
    state: np.ndarray
    instruction: np.ndarray
    chunk: np.ndarray
    chunk_mask: np.ndarray
    episode: np.ndarray
    instructions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def build(cls, features: list[np.ndarray], states: list[np.ndarray], actions: list[np.ndarray],
              texts: list[str], horizon: int, instructions: tuple[str, ...] | None = None) -> "TrainingSet":
        """Per episode: features [n, N, D], states [n, S], actions [n, A], its instruction.
        `instructions`: the vocabulary (default: the sorted distinct texts)."""
        instructions = tuple(sorted(set(texts))) if instructions is None else tuple(instructions)
        unknown = sorted(set(texts) - set(instructions))
        if unknown:
            raise ValueError(f"instructions {unknown} are not among the policy's {list(instructions)}")
        chunks, masks = zip(*(action_chunks(a, horizon) for a in actions))
        lengths = [len(a) for a in actions]
        return cls(
            features=np.concatenate(features).astype(np.float32),
            state=np.concatenate(states).astype(np.float32),
            instruction=np.repeat([instructions.index(t) for t in texts], lengths).astype(np.int32),
            chunk=np.concatenate(chunks).astype(np.float32),
            chunk_mask=np.concatenate(masks),
            episode=np.repeat(np.arange(len(actions)), lengths),
            instructions=instructions,
        )

    def episodes(self, keep: np.ndarray) -> "TrainingSet":
        """The rows of the episodes `keep` (positions), e.g. a held-out split."""
        rows = np.isin(self.episode, keep)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainingSet(**{k: v[rows] if isinstance(v, np.ndarray) else v for k, v in fields.items()})
