"""The LeRobot source on tiny datasets written here in the exact v2.1 and v3.0 layouts: frames land
on the right video offsets, poses in the wrist slot, tasks by task_index; bad input is refused."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from caip_jax import actions
from caip_jax.data import convert, records
from caip_jax.data.schema import EpisodeError
from caip_jax.data.sources import lerobot
from caip_jax.data.video import write_video

FPS = 10
LENGTHS = (6, 8, 7)
TASKS = ("pick up the cup", "open the drawer")
EPISODE_TASK = (0, 1, 0)
CAMERA = "observation.images.head"
OPTIONS = dict(video_key=CAMERA, left_pose="observation.ee_left", right_pose="observation.state[7:14]",
               right_valid="observation.right_valid")
NAN_FRAME = (1, 3)  # (episode, frame) whose right pose is NaN


def marker(episode: int, frame: int) -> np.ndarray:
    """A 48x64 frame whose left half's grey level encodes the episode and right half's the frame:
    flat grey survives H.264 and chroma subsampling."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = 40 + 50 * episode
    image[:, 32:] = 20 + 20 * frame
    return image


def read_marker(image: np.ndarray) -> tuple[int, int]:
    """The (episode, frame) a decoded `marker` shows (from the halves' interiors)."""
    left, right = image[8:40, 4:28].mean(), image[8:40, 36:60].mean()
    return round((left - 40) / 50), round((right - 20) / 20)


def pose(episode: int, frame: int, hand: int) -> np.ndarray:
    """Known pose x y z qx qy qz qw: about z by 0.1 * frame + hand radians, a place per (episode, hand)."""
    angle = 0.1 * frame + hand
    return np.array([episode, 0.01 * frame, 0.5 + hand, 0, 0, np.sin(angle / 2), np.cos(angle / 2)])


def pose_matrix(episode: int, frame: int, hand: int) -> np.ndarray:
    """`pose` as a [4, 4] matrix, built independently of the quaternion."""
    angle = 0.1 * frame + hand
    c, s = np.cos(angle), np.sin(angle)
    out = np.eye(4)
    out[:2, :2] = [[c, -s], [s, c]]
    out[:3, 3] = pose(episode, frame, hand)[:3]
    return out


def rows(episodes: list[int]) -> pa.Table:
    """Data rows of `episodes` (LeRobot default columns plus the pose columns), back to back."""
    columns = {name: [] for name in ("timestamp", "frame_index", "episode_index", "index", "task_index",
                                     "observation.ee_left", "observation.state", "observation.right_valid")}
    for episode in episodes:
        for frame in range(LENGTHS[episode]):
            right = pose(episode, frame, 1) * (np.nan if (episode, frame) == NAN_FRAME else 1)
            columns["timestamp"].append(frame / FPS)
            columns["frame_index"].append(frame)
            columns["episode_index"].append(episode)
            columns["index"].append(sum(LENGTHS[:episode]) + frame)
            columns["task_index"].append(EPISODE_TASK[episode])
            columns["observation.ee_left"].append(pose(episode, frame, 0).tolist())
            columns["observation.state"].append(np.concatenate([np.zeros(7), right]).tolist())
            columns["observation.right_valid"].append(float(frame != 0))  # frame 0: right hand invalid
    types = {"timestamp": pa.float32(), "frame_index": pa.int64(), "episode_index": pa.int64(),
             "index": pa.int64(), "task_index": pa.int64(), "observation.ee_left": pa.list_(pa.float32(), 7),
             "observation.state": pa.list_(pa.float32()), "observation.right_valid": pa.float32()}
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})


def write_info(root: str, version: str, data_path: str, video_path: str) -> None:
    vector = lambda n: {"dtype": "float32", "shape": [n], "names": None}
    features = {
        CAMERA: {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channels"]},
        "observation.ee_left": vector(7),
        "observation.state": vector(14),
        "observation.right_valid": vector(1),
        **{name: {"dtype": "int64", "shape": [1], "names": None}
           for name in ("frame_index", "episode_index", "index", "task_index")},
    }
    info = {"codebase_version": version, "robot_type": "test", "total_episodes": len(LENGTHS),
            "total_frames": sum(LENGTHS), "total_tasks": len(TASKS), "chunks_size": 2, "fps": FPS,
            "splits": {"train": f"0:{len(LENGTHS)}"}, "data_path": data_path, "video_path": video_path,
            "features": features}
    write_lines(f"{root}/meta/info.json", [info])


def write_lines(path: str, rows: list[dict]) -> None:
    """JSON, a line a row (one row: a JSON file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)


def write_parquet(path: str, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def write_mp4(path: str, markers: list[tuple[int, int]]) -> None:
    """An mp4 of the `marker` frames of (episode, frame) pairs, in order."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, np.stack([marker(episode, frame) for episode, frame in markers]), FPS)


def frames_of(episode: int) -> list[tuple[int, int]]:
    return [(episode, frame) for frame in range(LENGTHS[episode])]


def episode_rows() -> list[dict]:
    return [{"episode_index": episode, "tasks": [TASKS[EPISODE_TASK[episode]]], "length": length}
            for episode, length in enumerate(LENGTHS)]


def write_v21(root: str) -> None:
    """v2.1: a parquet and an mp4 per episode; chunks_size 2 puts episode 2 in chunk-001."""
    write_info(root, "v2.1", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
               "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    for episode in range(len(LENGTHS)):
        chunk = episode // 2
        write_parquet(f"{root}/data/chunk-{chunk:03d}/episode_{episode:06d}.parquet", rows([episode]))
        write_mp4(f"{root}/videos/chunk-{chunk:03d}/{CAMERA}/episode_{episode:06d}.mp4", frames_of(episode))
    write_lines(f"{root}/meta/episodes.jsonl", episode_rows())
    write_lines(f"{root}/meta/tasks.jsonl", [{"task_index": i, "task": task} for i, task in enumerate(TASKS)])


DATA_FILES = ((0, 1), (2,))  # v3.0: episodes per data file (file_index = position)
VIDEO_FILES = ((0,), (1, 2))  # split otherwise than the data, so each index must be the right one


def write_v30(root: str) -> None:
    """v3.0: episodes back to back in shared parquet and mp4 files, split over two files each."""
    write_info(root, "v3.0", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
               "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    meta = episode_rows()
    for episode, row in enumerate(meta):
        row.update(dataset_from_index=sum(LENGTHS[:episode]), dataset_to_index=sum(LENGTHS[: episode + 1]))
    for file_index, episodes in enumerate(DATA_FILES):
        write_parquet(f"{root}/data/chunk-000/file-{file_index:03d}.parquet", rows(list(episodes)))
        for episode in episodes:
            meta[episode].update({"data/chunk_index": 0, "data/file_index": file_index})
    v = f"videos/{CAMERA}/"
    for file_index, episodes in enumerate(VIDEO_FILES):
        write_mp4(f"{root}/{v}chunk-000/file-{file_index:03d}.mp4", sum(map(frames_of, episodes), []))
        start = 0
        for episode in episodes:
            end = start + LENGTHS[episode]
            meta[episode].update({v + "chunk_index": 0, v + "file_index": file_index,
                                  v + "from_timestamp": start / FPS, v + "to_timestamp": end / FPS})
            start = end
    write_parquet(f"{root}/meta/episodes/chunk-000/file-000.parquet", pa.Table.from_pylist(meta))
    # The task string as pandas stores an unnamed DataFrame index.
    write_parquet(f"{root}/meta/tasks.parquet",
                  pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": list(TASKS)}))


WRITERS = {"v2.1": write_v21, "v3.0": write_v30}


@pytest.fixture(params=sorted(WRITERS))
def dataset(request, tmp_path) -> str:
    root = str(tmp_path / request.param)
    WRITERS[request.param](root)
    return root


def test_reads_frames_poses_and_tasks(dataset):
    keys = lerobot.list_episodes(dataset, **OPTIONS)
    assert keys == ["episode_000000", "episode_000001", "episode_000002"]
    for episode, key in enumerate(keys):
        read = lerobot.read_episode(dataset, key, **OPTIONS)
        read.check()
        n = LENGTHS[episode]
        assert (read.source, read.episode_id, read.fps, read.view) == ("lerobot", key, FPS, "head")
        assert read.text == read.labels["task"] == TASKS[EPISODE_TASK[episode]]
        shown = [read_marker(image) for image in read.frames.read(np.arange(n))]
        assert shown == [(episode, frame) for frame in range(n)]
        for frame in range(n):
            for hand in (0, 1):
                got = read.hands[frame, hand]
                if (episode, frame, hand) == (*NAN_FRAME, 1):
                    assert np.isnan(got).any()  # passed through for the sanitize step
                    continue
                np.testing.assert_allclose(got[0], pose_matrix(episode, frame, hand), atol=1e-6)
                np.testing.assert_array_equal(got, np.broadcast_to(got[0], got.shape))  # wrist repeated
        np.testing.assert_array_equal(read.hand_valid, np.stack([np.ones(n), np.arange(n) != 0], 1))
        np.testing.assert_array_equal(read.camera, np.broadcast_to(np.eye(4), (n, 4, 4)))


def test_unmapped_hand_is_invalid_and_other_pose_formats(dataset):
    read = lerobot.read_episode(dataset, "episode_000002", video_key=CAMERA,
                                right_pose="observation.state[7:14]")
    assert not read.hand_valid[:, 0].any() and read.hand_valid[:, 1].all()
    want = np.stack([pose_matrix(0, f, 0) for f in range(3)])
    np.testing.assert_allclose(lerobot.pose_matrices(want.reshape(3, 16), "matrix", "t"), want)
    wxyz = np.stack([pose(0, f, 0)[[0, 1, 2, 6, 3, 4, 5]] for f in range(3)])  # x y z qw qx qy qz
    np.testing.assert_allclose(lerobot.pose_matrices(wxyz, "pos_quat_wxyz", "t"), want, atol=1e-12)


def test_unknown_version_is_refused(tmp_path):
    write_info(str(tmp_path), "v9.9", "", "")
    supported = r"codebase_version 'v9.9' is not supported \(supported: v2.0, v2.1, v3.0\)"
    with pytest.raises(ValueError, match=supported):
        lerobot.list_episodes(str(tmp_path))


def test_bad_mapping_is_refused(dataset):
    with pytest.raises(ValueError, match="not a video feature"):
        lerobot.read_episode(dataset, "episode_000000", video_key="observation.images.top")
    with pytest.raises(ValueError, match="no such feature"):
        lerobot.read_episode(dataset, "episode_000000", video_key=CAMERA, left_pose="observation.ee")
    with pytest.raises(ValueError, match="pose_format"):
        lerobot.read_episode(dataset, "episode_000000", video_key=CAMERA, pose_format="euler")


EPISODE_1_VIDEO = {"v2.1": f"videos/chunk-000/{CAMERA}/episode_000001.mp4",
                   "v3.0": f"videos/{CAMERA}/chunk-000/file-001.mp4"}


def test_missing_video_is_an_episode_error(dataset):
    os.remove(os.path.join(dataset, EPISODE_1_VIDEO[os.path.basename(dataset)]))
    with pytest.raises(EpisodeError, match=r"episode_000001: video .* does not exist"):
        lerobot.read_episode(dataset, "episode_000001", **OPTIONS)


def test_video_shorter_than_parquet_is_an_episode_error(tmp_path):
    root = str(tmp_path)
    write_v21(root)
    write_mp4(f"{root}/videos/chunk-000/{CAMERA}/episode_000001.mp4", frames_of(1)[:5])
    with pytest.raises(EpisodeError, match="episode_000001: 8 rows but the video range holds 5 frames"):
        lerobot.read_episode(root, "episode_000001", **OPTIONS)


def test_video_range_disagreeing_with_parquet_is_an_episode_error(tmp_path):
    root = str(tmp_path)
    write_v30(root)
    path = f"{root}/meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    column = f"videos/{CAMERA}/to_timestamp"
    ends = table.column(column).to_pylist()
    shifted = pa.array([end + (1 / FPS if episode == 2 else 0) for episode, end in enumerate(ends)])
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, shifted), path)
    with pytest.raises(EpisodeError, match="episode_000002: 7 rows but the video range holds 8 frames"):
        lerobot.read_episode(root, "episode_000002", **OPTIONS)


def test_converts_to_records_whose_frames_and_poses_match(dataset, tmp_path):
    """Through caip-make-records' conversion (10 Hz resampled to 30 Hz): each sample shows the
    marker of its own frame, and anchors on a source frame hold that frame's poses."""
    options = convert.ConvertOptions(horizon=3, stride=1)
    summary = convert.convert("lerobot", dataset, str(tmp_path), options, OPTIONS, shards=2)
    assert summary["episodes_converted"] == 3 and not summary["failed"]
    samples = [records.decode(r) for path in records.shard_paths(str(tmp_path)) for r in records.read_shard(path)]
    by_episode = {}
    for sample in samples:  # a shard holds whole episodes, each in anchor order
        by_episode.setdefault(int(sample["episode_id"].removeprefix("episode_")), []).append(sample)
    for episode, anchors in by_episode.items():
        assert len(anchors) == 3 * LENGTHS[episode] - 5  # 30 Hz steps with 3 future steps each
        for step, sample in enumerate(anchors):
            frame = sample["frame_index"]
            assert frame == (step + 1) // 3  # the source frame nearest the anchor's time
            image = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
            assert read_marker(image) == (episode, frame)
            if step % 3:
                continue  # between source frames: interpolated poses
            anchor = actions.decompress_poses(sample["poses"])[0]  # [2, 21, 4, 4]; camera = world
            for hand in (0, 1):
                # The right hand: invalid at frame 0 (its validity column) and at the NaN pose.
                assert sample["valid"][0, hand] == (hand == 0 or (frame != 0 and (episode, frame) != NAN_FRAME))
                if sample["valid"][0, hand]:
                    np.testing.assert_allclose(anchor[hand, 0], pose_matrix(episode, frame, hand), atol=1e-5)
