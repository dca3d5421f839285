"""LeRobot datasets (codebase v2.0 / v2.1 and v3.0) as episodes of end-effector poses.

Layouts, as huggingface/lerobot defines them (src/lerobot/datasets/utils.py path constants
DEFAULT_*_PATH and LEGACY_*_PATH; lerobot_dataset.py `get_data_file_path`,
`get_video_file_path`, `_query_videos`; datasets/v30/convert_dataset_v21_to_v30.py for the
v3.0 per-episode columns):

    meta/info.json (all versions): codebase_version, fps, features {name: {dtype ("video" for
        a camera), shape, names}}, data_path and video_path (format templates), chunks_size,
        total_episodes, total_frames, ...
    Data rows (all versions): the features plus timestamp, frame_index, episode_index, index
        (global row number) and task_index.

    v2.0 / v2.1 (identical apart from stats): one parquet and one mp4 per episode
        data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
        videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
        episode_chunk = episode_index // chunks_size
        meta/episodes.jsonl   {"episode_index", "tasks": [str], "length"} a line
        meta/tasks.jsonl      {"task_index", "task"} a line

    v3.0: many episodes per file
        data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet
        videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4  (episodes back to back)
        meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet, a row per episode:
            episode_index, tasks, length, data/chunk_index, data/file_index, dataset_from_index,
            dataset_to_index (global `index` range, end exclusive), videos/{video_key}/chunk_index,
            videos/{video_key}/file_index, videos/{video_key}/from_timestamp,
            videos/{video_key}/to_timestamp (seconds within the video file), meta/episodes/...,
            stats/...
        meta/tasks.parquet    column task_index; the task string is the pandas index (stored as
            column "task" or "__index_level_0__", depending on the writer)
        Frame i of an episode is at from_timestamp + i / fps in its video file (lerobot's
        `_query_videos` shifts episode timestamps by from_timestamp), so the episode starts at
        decode-order frame round(from_timestamp * fps).

Options (the config's column mapping):

    video_key     the camera feature of the view, e.g. "observation.images.head" (required)
    view          "head" (default) or "wrist"
    left_pose, right_pose
                  column holding that hand's end-effector pose: "name", or "name[a:b]" for a slice
                  of a vector column (e.g. "observation.state[0:7]"). An unmapped hand is invalid
                  throughout. The pose fills all 21 keypoint slots (schema.py: wrist repeated).
    pose_format   "pos_quat_xyzw" (default: x y z qx qy qz qw, metres; the quaternion is
                  normalised), "pos_quat_wxyz" (x y z qw qx qy qz), or "matrix" (16 values,
                  row-major 4x4).
    camera_pose   column holding world-from-camera (OpenCV axes) in pose_format. Unmapped: a
                  fixed camera, identity world-from-camera, i.e. the poses are in the camera frame.
    left_valid, right_valid
                  columns, nonzero = valid. Unmapped: valid on every frame where the pose is mapped.

NaN poses are passed through (a later sanitize step invalidates them); null pose rows become NaN.
Episode keys are "episode_{episode_index:06d}".
"""
import dataclasses
import glob
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caip_jax.data import video
from caip_jax.data.schema import NUM_HANDS, NUM_KEYPOINTS, Episode, EpisodeError

POSE_WIDTHS = {"pos_quat_xyzw": 7, "pos_quat_wxyz": 7, "matrix": 16}
_KEY = re.compile(r"episode_(\d+)")
_SPEC = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where an episode lives: its parquet file, its video file and frame range there, and its
    length per the episode metadata. `count` None: the rest of the video file."""

    data: str
    video: str
    first: int
    count: int | None
    length: int


# ---------------------------------------------------------------------------------------------
# The two layouts: which episodes exist, where one lives, the task table.


class _V21:
    """v2.0 / v2.1: a parquet and an mp4 per episode, metadata in JSON lines."""

    @staticmethod
    def _episodes(root: str) -> dict[int, dict]:
        return {int(row["episode_index"]): row for row in _jsonl(os.path.join(root, "meta/episodes.jsonl"))}

    @staticmethod
    def indices(root: str) -> list[int]:
        return list(_V21._episodes(root))

    @staticmethod
    def locate(root: str, info: dict, index: int, video_key: str) -> _Location:
        episode = _V21._episodes(root).get(index)
        if episode is None:
            raise EpisodeError(f"episode_{index:06d}: not in meta/episodes.jsonl")
        chunk = index // int(info["chunks_size"])
        names = dict(episode_chunk=chunk, episode_index=index, video_key=video_key)
        return _Location(
            data=os.path.join(root, info["data_path"].format(**names)),
            video=os.path.join(root, info["video_path"].format(**names)),
            first=0,
            count=None,
            length=int(episode["length"]),
        )

    @staticmethod
    def tasks(root: str) -> dict[int, str]:
        return {int(row["task_index"]): row["task"] for row in _jsonl(os.path.join(root, "meta/tasks.jsonl"))}


class _V30:
    """v3.0: episodes back to back in shared parquet and mp4 files, metadata in parquet."""

    @staticmethod
    def _episodes(root: str, columns: list[str], index: int | None = None) -> pa.Table:
        files = sorted(glob.glob(os.path.join(root, "meta/episodes/*/*.parquet")))
        if not files:
            raise ValueError(f"{root}: no meta/episodes/*/*.parquet")
        filters = None if index is None else [("episode_index", "=", index)]
        return pq.ParquetDataset(files, filters=filters).read(columns=columns)

    @staticmethod
    def indices(root: str) -> list[int]:
        return _V30._episodes(root, ["episode_index"]).column("episode_index").to_pylist()

    @staticmethod
    def locate(root: str, info: dict, index: int, video_key: str) -> _Location:
        v = f"videos/{video_key}/"
        columns = ["data/chunk_index", "data/file_index", "dataset_from_index", "dataset_to_index"]
        columns += [v + "chunk_index", v + "file_index", v + "from_timestamp", v + "to_timestamp"]
        rows = _V30._episodes(root, columns, index).to_pylist()
        if len(rows) != 1:
            raise EpisodeError(f"episode_{index:06d}: {len(rows)} rows in meta/episodes, expected 1")
        row, fps = rows[0], float(info["fps"])
        first = round(row[v + "from_timestamp"] * fps)
        return _Location(
            data=os.path.join(root, info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])),
            video=os.path.join(root, info["video_path"].format(
                video_key=video_key, chunk_index=row[v + "chunk_index"], file_index=row[v + "file_index"])),
            first=first,
            count=round(row[v + "to_timestamp"] * fps) - first,
            length=row["dataset_to_index"] - row["dataset_from_index"],
        )

    @staticmethod
    def tasks(root: str) -> dict[int, str]:
        table = pq.read_table(os.path.join(root, "meta/tasks.parquet"))
        # The task string is the DataFrame index: named "task" or unnamed, per lerobot version.
        text = next((name for name, kind in zip(table.column_names, table.schema.types)
                     if pa.types.is_string(kind) or pa.types.is_large_string(kind)), None)
        if text is None:
            raise ValueError(f"{root}: meta/tasks.parquet has no task string column ({table.column_names})")
        return dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist()))


LAYOUTS = {"v2.0": _V21, "v2.1": _V21, "v3.0": _V30}


def _jsonl(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def _info(root: str) -> tuple[dict, type]:
    """meta/info.json and the layout class of its codebase_version; refuses unknown versions."""
    with open(os.path.join(root, "meta/info.json")) as file:
        info = json.load(file)
    version = info.get("codebase_version")
    if version not in LAYOUTS:
        raise ValueError(f"{root}: LeRobot codebase_version {version!r} is not supported "
                         f"(supported: {', '.join(LAYOUTS)})")
    return info, LAYOUTS[version]


# ---------------------------------------------------------------------------------------------
# Columns to arrays, poses to matrices.


def _parse_spec(spec: str) -> tuple[str, slice]:
    """'name' or 'name[a:b]' -> (column name, slice of its vector)."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"column spec {spec!r} is not 'name' or 'name[a:b]'")
    bound = lambda text: int(text) if text else None
    return match["name"], slice(bound(match["start"]), bound(match["stop"]))


def _values(table: pa.Table, spec: str, key: str) -> np.ndarray:
    """Column `spec` of `table` -> [n, width] float64; null rows are NaN."""
    name, part = _parse_spec(spec)
    column = table.column(name).combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        return pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy()[:, None][:, part]
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    lengths = set(pc.list_value_length(column.filter(valid)).to_pylist())
    if len(lengths) != 1:
        raise EpisodeError(f"{key}: column {name!r} has rows of lengths {sorted(lengths)} (nulls left out)")
    width = lengths.pop()
    out = np.full((len(column), width), np.nan)
    out[valid] = pc.cast(pc.list_flatten(column.filter(valid)), pa.float64()).to_numpy().reshape(-1, width)
    return out[:, part]


def _quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """[n, 4] quaternions x y z w (any norm) -> [n, 3, 3] rotations; a zero quaternion gives NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        x, y, z, w = (q / np.linalg.norm(q, axis=-1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def pose_matrices(values: np.ndarray, pose_format: str, what: str) -> np.ndarray:
    """[n, width] pose vectors in `pose_format` -> [n, 4, 4] SE(3) matrices."""
    if values.shape[1] != POSE_WIDTHS[pose_format]:
        raise EpisodeError(f"{what}: {values.shape[1]} values a row, {pose_format} needs "
                           f"{POSE_WIDTHS[pose_format]}")
    if pose_format == "matrix":
        return values.reshape(-1, 4, 4)
    quaternion = values[:, 3:] if pose_format == "pos_quat_xyzw" else np.roll(values[:, 3:], -1, axis=1)
    out = np.tile(np.eye(4), (len(values), 1, 1))
    out[:, :3, :3] = _quaternion_matrix(quaternion)
    out[:, :3, 3] = values[:, :3]
    return out


# ---------------------------------------------------------------------------------------------
# The source interface.


@dataclasses.dataclass(frozen=True)
class Mapping:
    """The read_episode options (see the module docstring)."""

    video_key: str
    view: str = "head"
    left_pose: str | None = None
    right_pose: str | None = None
    pose_format: str = "pos_quat_xyzw"
    camera_pose: str | None = None
    left_valid: str | None = None
    right_valid: str | None = None

    def specs(self) -> list[str]:
        """The mapped column specs."""
        names = ("left_pose", "right_pose", "camera_pose", "left_valid", "right_valid")
        return [getattr(self, name) for name in names if getattr(self, name)]

    def check(self, info: dict) -> None:
        """Refuses (ValueError: a configuration error, not a bad episode) a video key, pose format
        or column the dataset does not have."""
        features = info["features"]
        cameras = [name for name, feature in features.items() if feature.get("dtype") == "video"]
        if self.video_key not in cameras:
            raise ValueError(f"video_key {self.video_key!r} is not a video feature (have {cameras})")
        if self.pose_format not in POSE_WIDTHS:
            raise ValueError(f"pose_format {self.pose_format!r} is not one of {list(POSE_WIDTHS)}")
        for spec in self.specs():
            if _parse_spec(spec)[0] not in features:
                raise ValueError(f"column {spec!r}: no such feature (have {list(features)})")


def list_episodes(input_path: str, **options) -> list[str]:
    """Keys "episode_{episode_index:06d}" of the dataset at `input_path`, sorted."""
    _, layout = _info(input_path)
    return sorted(f"episode_{index:06d}" for index in layout.indices(input_path))


def _rows(location: _Location, index: int, columns: list[str], key: str) -> pa.Table:
    """The episode's rows of its parquet file (only `columns`), in frame order, checked to be
    frames 0 .. length - 1."""
    if not os.path.exists(location.data):
        raise EpisodeError(f"{key}: data file {location.data} does not exist")
    missing = sorted(set(columns) - set(pq.read_schema(location.data).names))
    if missing:
        raise EpisodeError(f"{key}: {location.data} lacks columns {missing}")
    table = pq.read_table(location.data, columns=columns, filters=[("episode_index", "=", index)])
    table = table.sort_by("frame_index")
    if table.num_rows == 0 or table.num_rows != location.length:
        raise EpisodeError(f"{key}: {table.num_rows} rows in {location.data}, "
                           f"episode metadata says {location.length}")
    if table.column("frame_index").to_pylist() != list(range(table.num_rows)):
        raise EpisodeError(f"{key}: frame_index is not 0..{table.num_rows - 1}")
    return table


def _frames(location: _Location, n: int, key: str) -> video.VideoFrames:
    """The episode's `n` frames in its video file, checked against the file's frame count."""
    if not os.path.exists(location.video):
        raise EpisodeError(f"{key}: video {location.video} does not exist")
    total = video.count_frames(location.video)  # its packets, read once per file and process
    count = total - location.first if location.count is None else location.count
    if count != n or location.first + n > total:
        raise EpisodeError(f"{key}: {n} rows but the video range holds {count} frames "
                           f"(from frame {location.first} of {total} in {location.video})")
    return video.VideoFrames(location.video, location.first, n)


def _hands(table: pa.Table, mapping: Mapping, key: str) -> tuple[np.ndarray, np.ndarray]:
    """-> hands [n, 2, 21, 4, 4] (the end-effector pose in every keypoint slot; identity where
    unmapped), hand_valid [n, 2]."""
    n = table.num_rows
    hands = np.tile(np.eye(4), (n, NUM_HANDS, NUM_KEYPOINTS, 1, 1))
    valid = np.zeros((n, NUM_HANDS), bool)
    for hand, side in enumerate(("left", "right")):
        spec, flag = getattr(mapping, f"{side}_pose"), getattr(mapping, f"{side}_valid")
        if not spec:
            continue
        pose = pose_matrices(_values(table, spec, key), mapping.pose_format, f"{key} {side}_pose")
        hands[:, hand] = pose[:, None]
        valid[:, hand] = np.nan_to_num(_values(table, flag, key)[:, 0]) != 0 if flag else True
    return hands, valid


def _camera(table: pa.Table, mapping: Mapping, key: str) -> np.ndarray:
    """-> world-from-camera [n, 4, 4]: the camera_pose column, or identity (a fixed camera)."""
    if not mapping.camera_pose:
        return np.tile(np.eye(4), (table.num_rows, 1, 1))
    return pose_matrices(_values(table, mapping.camera_pose, key), mapping.pose_format, f"{key} camera_pose")


def read_episode(input_path: str, key: str, **options) -> Episode:
    """The episode `key` ("episode_000003") of the dataset at `input_path`; options: `Mapping`.
    Raises EpisodeError (naming the episode) for missing files and counts that disagree,
    ValueError for an unsupported version or a mapping the dataset lacks."""
    try:
        mapping = Mapping(**options)
    except TypeError as error:
        raise ValueError(f"lerobot options {sorted(options)}: {error}") from error
    info, layout = _info(input_path)
    mapping.check(info)
    match = _KEY.fullmatch(key)
    if not match:
        raise EpisodeError(f"{key}: not an episode key (episode_NNNNNN)")
    index = int(match[1])
    location = layout.locate(input_path, info, index, mapping.video_key)
    mapped = [_parse_spec(spec)[0] for spec in mapping.specs()]
    columns = list(dict.fromkeys(["episode_index", "frame_index", "task_index"] + mapped))
    table = _rows(location, index, columns, key)
    frames = _frames(location, table.num_rows, key)
    hands, hand_valid = _hands(table, mapping, key)
    task_index = table.column("task_index")[0].as_py()
    text = layout.tasks(input_path).get(task_index)
    if text is None:
        raise EpisodeError(f"{key}: task_index {task_index} is not in the task table")
    return Episode(
        source="lerobot",
        episode_id=key,
        text=text,
        fps=float(info["fps"]),
        hands=hands,
        hand_valid=hand_valid,
        camera=_camera(table, mapping, key),
        frames=frames,
        view=mapping.view,
        labels={"task": text},
    )
