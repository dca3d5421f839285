"""Writes episodes as a LeRobot v2.1 dataset (the layout caip_jax/data/sources/lerobot.py reads;
its docstring cites lerobot's definitions), one episode at a time, so memory holds one episode.

    meta/info.json       codebase_version "v2.1", fps, features, data_path, video_path, ...
    meta/episodes.jsonl  {"episode_index", "tasks": [text], "length"} a line
    meta/tasks.jsonl     {"task_index", "task"} a line
    data/chunk-000/episode_000000.parquet   columns: observation.state, observation.environment_state,
        action, next.success, timestamp, frame_index, episode_index, index, task_index
    videos/chunk-000/observation.images.CAMERA/episode_000000.mp4   (when frames are given)

Row i holds the observation before action i, as LeRobot records: the action a policy should
take when it sees frame i.
"""
import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caip_jax.data.video import write_video

CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
STATE, ENV_STATE, ACTION, SUCCESS = "observation.state", "observation.environment_state", "action", "next.success"


@dataclasses.dataclass
class RecordedEpisode:
    """n steps: frames [n, H, W, 3] uint8 or None, state [n, S], env_state [n, O], action [n, A],
    success [n] (after each action), and the instruction."""

    frames: np.ndarray | None
    state: np.ndarray
    env_state: np.ndarray
    action: np.ndarray
    success: np.ndarray
    text: str


def _vector(width: int) -> dict:
    return {"dtype": "float32", "shape": [width], "names": None}


class Writer:
    """`add` episodes, then `close` (writes meta/info.json: a dataset without it is incomplete)."""

    def __init__(self, root: str, fps: float, camera_key: str | None, robot_type: str = "unknown"):
        self.root, self.fps, self.camera_key, self.robot_type = root, fps, camera_key, robot_type
        self._episodes, self._tasks, self._frames, self._shapes = [], {}, 0, None

    def add(self, episode: RecordedEpisode) -> None:
        index, n = len(self._episodes), len(episode.action)
        shapes = dict(state=episode.state.shape[1], env_state=episode.env_state.shape[1], action=episode.action.shape[1],
                      image=None if episode.frames is None else list(episode.frames.shape[1:]))
        if self._shapes not in (None, shapes):
            raise ValueError(f"episode {index} has shapes {shapes}, the dataset's are {self._shapes}")
        if (episode.frames is None) != (self.camera_key is None):
            raise ValueError(f"episode {index}: frames must be given exactly when the dataset has a camera key")
        self._shapes = shapes
        task = self._tasks.setdefault(episode.text, len(self._tasks))
        names = dict(episode_chunk=index // CHUNKS_SIZE, episode_index=index, video_key=self.camera_key)
        vectors = lambda x: pa.array(list(np.asarray(x, np.float32)), pa.list_(pa.float32(), x.shape[1]))
        table = pa.table({
            STATE: vectors(episode.state), ENV_STATE: vectors(episode.env_state), ACTION: vectors(episode.action),
            SUCCESS: pa.array(np.asarray(episode.success, bool)),
            "timestamp": pa.array(np.arange(n) / self.fps, pa.float32()),
            "frame_index": pa.array(np.arange(n), pa.int64()),
            "episode_index": pa.array(np.full(n, index), pa.int64()),
            "index": pa.array(self._frames + np.arange(n), pa.int64()),
            "task_index": pa.array(np.full(n, task), pa.int64()),
        })
        path = os.path.join(self.root, DATA_PATH.format(**names))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)
        if episode.frames is not None:
            path = os.path.join(self.root, VIDEO_PATH.format(**names))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_video(path, episode.frames, self.fps)
        self._episodes.append({"episode_index": index, "tasks": [episode.text], "length": n})
        self._frames += n

    def close(self) -> None:
        if not self._episodes:
            raise ValueError(f"{self.root}: no episodes were added")
        s = self._shapes
        features = {STATE: _vector(s["state"]), ENV_STATE: _vector(s["env_state"]), ACTION: _vector(s["action"]),
                    SUCCESS: {"dtype": "bool", "shape": [1], "names": None},
                    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                    **{k: {"dtype": "int64", "shape": [1], "names": None}
                       for k in ("frame_index", "episode_index", "index", "task_index")}}
        if self.camera_key:
            features[self.camera_key] = {"dtype": "video", "shape": s["image"], "names": ["height", "width", "channels"],
                                         "info": {"video.fps": self.fps, "video.codec": "h264", "video.pix_fmt": "yuv420p"}}
        n = len(self._episodes)
        info = dict(codebase_version="v2.1", robot_type=self.robot_type, total_episodes=n, total_frames=self._frames,
                    total_tasks=len(self._tasks), total_videos=n if self.camera_key else 0,
                    total_chunks=(n - 1) // CHUNKS_SIZE + 1, chunks_size=CHUNKS_SIZE, fps=self.fps,
                    splits={"train": f"0:{n}"}, data_path=DATA_PATH, video_path=VIDEO_PATH, features=features)
        meta = os.path.join(self.root, "meta")
        os.makedirs(meta, exist_ok=True)
        _write_lines(os.path.join(meta, "episodes.jsonl"), self._episodes)
        _write_lines(os.path.join(meta, "tasks.jsonl"), [{"task_index": i, "task": t} for t, i in self._tasks.items()])
        with open(os.path.join(meta, "info.json"), "w") as f:
            json.dump(info, f, indent=2)


def _write_lines(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
