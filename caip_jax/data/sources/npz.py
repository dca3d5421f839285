"""The plain format anyone can write from HaMeR-style or motion-capture outputs: one `.npz` per
episode, anywhere below the input directory.

    hands       [N, 2, 21, 4, 4] float  world-from-keypoint SE(3), metres (order: schema.py)
    hand_valid  [N, 2] bool             (optional: all True)
    camera      [N, 4, 4] float         world-from-camera, OpenCV axes (x right, y down, z forward)
    fps         scalar
    text        str scalar              the instruction
    frames      [N, H, W, 3] uint8      the frames, or instead:
    video       str scalar              an mp4 with N frames, relative to the .npz
    intrinsics  [3, 3] (optional)       pixels of the frames
    view        str scalar (optional)   'head' (default) or 'wrist'

    np.savez(path, hands=..., camera=..., fps=30.0, text="pick up the cup", video="ep0.mp4")
"""
import os

import numpy as np

from caip_jax.data import video
from caip_jax.data.schema import ArrayFrames, Episode, EpisodeError


def list_episodes(input_path: str, **options) -> list[str]:
    """Keys: paths of the .npz files relative to `input_path`, without the extension."""
    keys = []
    for directory, _, files in os.walk(input_path):
        for name in files:
            if name.endswith(".npz"):
                keys.append(os.path.relpath(os.path.join(directory, name[: -len(".npz")]), input_path))
    return sorted(keys)


def read_episode(input_path: str, key: str, **options) -> Episode:
    path = os.path.join(input_path, key + ".npz")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise EpisodeError(f"{key}: cannot read {path}: {error}") from error
    missing = [name for name in ("hands", "camera", "fps", "text") if name not in data]
    if "frames" not in data and "video" not in data:
        missing.append("frames or video")
    if missing:
        raise EpisodeError(f"{key}: {path} lacks {missing}")
    hands = data["hands"].astype(np.float64)
    if "frames" in data:
        frames = ArrayFrames(data["frames"])
    else:
        video_path = os.path.join(os.path.dirname(path), str(data["video"]))
        if not os.path.exists(video_path):
            raise EpisodeError(f"{key}: video {video_path} does not exist")
        frames = video.VideoFrames(video_path, 0, video.count_frames(video_path))
    return Episode(
        source="npz",
        episode_id=key,
        text=str(data["text"]),
        fps=float(data["fps"]),
        hands=hands,
        hand_valid=data["hand_valid"].astype(bool) if "hand_valid" in data else np.ones(hands.shape[:2], bool),
        camera=data["camera"].astype(np.float64),
        frames=frames,
        view=str(data["view"]) if "view" in data else "head",
        intrinsics=data["intrinsics"].astype(np.float64) if "intrinsics" in data else None,
    )
