"""Episodes -> record sets: samples, statistics, and bad input counted by name, never lost."""
import io
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from caip_jax import actions
from caip_jax.data import convert, records
from caip_jax.data.stats import RunningStats

OPTIONS = convert.ConvertOptions(horizon=8, stride=4, jpeg_short_side=32)


def rigid_episode(rng, frames=20, size=(40, 48)):
    """World-frame hands moving smoothly, a fixed camera, flat-colour frames (colour = frame)."""
    angles = rng.uniform(-np.pi, np.pi, (2, 21, 3))
    steps = np.linspace(0, 1, frames)[:, None, None, None]
    rotation = actions.quat_to_matrix(actions.rotvec_to_quat(angles[None] * steps))
    translation = rng.uniform(-0.3, 0.3, (2, 21, 3))[None] + 0.1 * steps + np.array([0, 0, 0.6])
    pixels = np.broadcast_to((np.arange(frames) * 10 % 250).astype(np.uint8)[:, None, None, None], (frames, *size, 3))
    return dict(
        hands=actions.compose(rotation, translation),
        camera=np.broadcast_to(np.eye(4), (frames, 4, 4)),
        fps=30.0,
        text="pick up the cup",
        frames=np.ascontiguousarray(pixels),
        intrinsics=np.array([[50.0, 0, 24], [0, 50, 20], [0, 0, 1]]),
    )


def write_npz(directory, name, **content):
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, name + ".npz"), **content)


def write_corrupt(directory, name):
    with open(os.path.join(directory, name + ".npz"), "wb") as f:
        f.write(b"not a zip file")


@pytest.fixture(scope="module")
def npz_input(tmp_path_factory):
    """Three good episodes and four bad ones, each bad in its own way."""
    root = str(tmp_path_factory.mktemp("npz"))
    rng = np.random.default_rng(0)
    for i in range(3):
        write_npz(root, f"good_{i}", **rigid_episode(rng))
    nan_pose = rigid_episode(rng)
    nan_pose["hands"][5, 1, 3] = np.nan
    write_npz(root, "good_with_nan_pose", **nan_pose)
    write_npz(root, "bad_too_short", **rigid_episode(rng, frames=6))
    mismatch = rigid_episode(rng)
    mismatch["frames"] = mismatch["frames"][:-2]
    write_npz(root, "bad_frame_count", **mismatch)
    write_npz(root, "bad_no_camera", **{k: v for k, v in rigid_episode(rng).items() if k != "camera"})
    write_corrupt(root, "bad_corrupt")
    return root


@pytest.fixture(scope="module")
def converted(npz_input, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("records"))
    return output, convert.convert("npz", npz_input, output, OPTIONS, workers=1, shards=3)


def all_samples(directory):
    samples = []
    for path in records.shard_paths(directory):
        samples += [records.decode(r) for r in records.read_shard(path)]
    return samples


def test_bad_episodes_are_counted_by_name_and_the_rest_converts(converted):
    _, summary = converted
    assert set(summary["failed"]) == {"bad_too_short", "bad_frame_count", "bad_no_camera", "bad_corrupt"}
    assert "too short" in summary["failed"]["bad_too_short"]
    assert "18 frames but 20 poses" in summary["failed"]["bad_frame_count"]
    assert "camera" in summary["failed"]["bad_no_camera"]
    assert summary["episodes_converted"] == 4 and summary["episodes_listed"] == 8
    assert summary["invalidated_hand_frames"] == {"good_with_nan_pose": 1}
    # 20 frames, horizon 8, stride 4: anchors 0, 4, 8 in each good episode.
    assert summary["records"] == 12


def test_samples_hold_the_anchor_frame_and_the_chunk(converted, npz_input):
    output, _ = converted
    samples = {(s["episode_id"], s["frame_index"]): s for s in all_samples(output)}
    assert len(samples) == 12
    episode = np.load(os.path.join(npz_input, "good_1.npz"))
    sample = samples[("good_1", 4)]
    image = np.asarray(Image.open(io.BytesIO(sample["image"])))
    assert min(image.shape[:2]) == 32  # short side resized from 40
    assert abs(image.mean() - episode["frames"][4].mean()) < 2  # the anchor frame, not another
    np.testing.assert_allclose(sample["intrinsics"], episode["intrinsics"] * [[0.8], [0.8], [1]], rtol=1e-6)
    exact = actions.action_chunk(actions.to_camera_frame(episode["hands"][4:13], episode["camera"][4]), np.ones((9, 2), bool))
    stored = actions.action_chunk(actions.decompress_poses(sample["poses"]), sample["valid"])
    np.testing.assert_allclose(stored[0], exact[0], atol=1e-4)
    np.testing.assert_array_equal(stored[1], exact[1])
    # The NaN pose masks its hand at that frame only: frame 5 is step 1 of the anchor at 4.
    nan_sample = samples[("good_with_nan_pose", 4)]
    assert not nan_sample["valid"][1, 1] and nan_sample["valid"][1, 0] and nan_sample["valid"][2].all()


def test_stats_are_those_of_every_stored_chunk(converted):
    output, _ = converted
    stats = records.read_json(output, "stats.json")
    for delta in actions.DELTAS:
        expected = RunningStats()
        for s in all_samples(output):
            expected.update(*actions.action_chunk(actions.decompress_poses(s["poses"]), s["valid"], delta))
        got = RunningStats.from_json(stats[delta])
        np.testing.assert_array_equal(got.count, expected.count)
        # The converter measures exact poses; records hold them quantised (about 1e-4 rad).
        np.testing.assert_allclose(got.mean, expected.mean, atol=1e-4)
        np.testing.assert_allclose(got.std, expected.std, atol=1e-4)


def test_output_does_not_depend_on_the_number_of_workers(converted, npz_input, tmp_path):
    output, _ = converted
    convert.convert("npz", npz_input, str(tmp_path), OPTIONS, workers=2, shards=3)
    for a, b in zip(records.shard_paths(output), records.shard_paths(str(tmp_path)), strict=True):
        assert records.read_shard(a) == records.read_shard(b)


def test_more_shards_than_episodes_leaves_only_readable_shards(npz_input, tmp_path):
    summary = convert.convert("npz", npz_input, str(tmp_path), OPTIONS, shards=16)
    paths = records.shard_paths(str(tmp_path))
    assert len(paths) == 4  # the 4 converted episodes, one shard each
    assert sum(len(records.read_shard(p)) for p in paths) == summary["records"]


def test_unknown_source_and_empty_input_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown source 'egodx'"):
        convert.convert("egodx", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="found no episodes"):
        convert.convert("npz", str(tmp_path), str(tmp_path / "out"))


def test_an_episode_s_warnings_are_those_its_own_thread_logs():
    """Beam's DirectRunner may convert episodes in threads: one's warnings are not another's."""
    logger = logging.getLogger("caip_jax.data.sources.somewhere")
    with convert._warnings_logged() as messages:
        logger.warning("this episode's file is odd")
        other = threading.Thread(target=logger.warning, args=("another episode's file is odd",))
        other.start()
        other.join()
        logger.info("not a warning")
    logger.warning("after the episode")
    assert messages == ["this episode's file is odd"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_records(*args: str) -> subprocess.CompletedProcess:
    """caip-make-records as a user runs it: its exit status is what a pipeline sees."""
    command = [sys.executable, "-m", "tools.make_records", "--horizon=8", "--stride=4", "--workers=1", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("all_bad"))
    write_npz(root, "bad_too_short", **rigid_episode(np.random.default_rng(4), frames=6))
    write_corrupt(root, "bad_corrupt")
    return root


def test_make_records_fails_when_every_episode_fails(all_bad, tmp_path):
    run = make_records("--source=npz", f"--input={all_bad}", f"--output={tmp_path}")
    assert run.returncode == 1, run.stderr
    assert "ERROR: all 2 episodes failed, none converted" in run.stderr
    assert "bad_corrupt: cannot read" in run.stderr and "bad_too_short: 6 steps" in run.stderr
    assert records.read_json(str(tmp_path), "summary.json")["episodes_failed"] == 2


@pytest.mark.parametrize("max_fraction, status, word", [(0.4, 1, "ERROR"), (0.5, 0, "WARNING")])
def test_make_records_exit_status_follows_the_failure_fraction(npz_input, tmp_path, max_fraction, status, word):
    """4 of 8 failed: above 0.4, status 1 after writing the other 4; at 0.5, status 0 with a warning."""
    run = make_records("--source=npz", f"--input={npz_input}", f"--output={tmp_path}",
                       f"--max_failure_fraction={max_fraction}")
    assert run.returncode == status, run.stderr
    assert f"{word}: 4 of 8 episodes (50.0%) failed" in run.stderr
    assert "bad_corrupt: cannot read" in run.stderr and f"{tmp_path}/summary.json" in run.stderr
    # Either way the record set holds the four good episodes (anchors 0, 4, 8 each).
    assert sum(len(records.read_shard(p)) for p in records.shard_paths(str(tmp_path))) == 12
