"""caip-inspect's library: statistics, keypoints drawn where the poses project, the dump."""
import io

import numpy as np
from PIL import Image

from caip_jax import actions
from caip_jax.data import inspect, pipeline, records


def test_describe_counts_the_record_set(record_set):
    description = inspect.describe(record_set[0])
    assert description["records"] == 18 and description["episodes"] == 6
    assert description["sources"] == {"npz": 18} and description["future_steps"] == 8
    assert description["bytes_per_record"] > description["jpeg_bytes_per_record"] > 0
    sampled = inspect.describe(record_set[0], max_records=5)  # bounded work on a set of any size
    assert sampled["records"] == 18 and sampled["described"] == 5


def test_keypoints_are_drawn_where_the_anchor_poses_project(record_set):
    sample = records.decode(records.read_shard(records.shard_paths(record_set[0])[0])[0])
    plain = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB")).astype(int)
    drawn = np.asarray(inspect.draw_hands(sample)).astype(int)
    k = sample["intrinsics"]
    right = actions.decompress_poses(sample["poses"])[0, 1, :, :3, 3]  # [21, 3], camera frame
    uv = np.round(right[:, :2] / right[:, 2:] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]).astype(int)
    inside = [(u, v) for u, v in uv if 0 <= v < plain.shape[0] and 0 <= u < plain.shape[1]]
    assert len(inside) >= 5, "the fixture should put the right hand in view"
    for u, v in inside:  # the right hand is drawn last, so its dots are on top
        np.testing.assert_array_equal(drawn[v, u], inspect.HAND_COLOURS[1])


def test_dump_holds_unnormalised_samples_in_record_order(record_set, tmp_path):
    directory, spm = record_set
    preprocess = pipeline.Preprocess(spm, 16, 8, horizon=8, with_metadata=True)
    inspect.dump(directory, preprocess, 5, str(tmp_path / "d.npz"))
    dumped = np.load(tmp_path / "d.npz")
    first = [records.decode(pipeline.record_dataset(directory)[i]) for i in range(5)]
    assert dumped["image"].shape == (5, 16, 16, 3) and dumped["text_ids"].shape == (5, 8)
    np.testing.assert_array_equal(dumped["frame_index"], [s["frame_index"] for s in first])
    np.testing.assert_array_equal(dumped["episode_id"], [s["episode_id"] for s in first])
    for row, sample in zip(dumped["action"], first):
        expected, _ = actions.action_chunk(actions.decompress_poses(sample["poses"]), sample["valid"])
        np.testing.assert_allclose(row, expected, atol=1e-6)
