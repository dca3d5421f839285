"""EgoDex source on tiny episodes written here in EgoDex's own layout (partN/<task>/<i>.hdf5 + .mp4),
including the defects that github.com/apple/ml-egodex's issues report of the published files."""
import io
import logging
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from caip_jax import actions
from caip_jax.data import convert, records
from caip_jax.data.schema import EpisodeError
from caip_jax.data.sources import egodex
from caip_jax.data.video import write_video

N, H, W = 10, 48, 64
K = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
# Our 21 slots written out by hand from the paper's joint list, independently of the module's table.
SLOTS = [
    "Hand",
    "ThumbKnuckle", "ThumbIntermediateBase", "ThumbIntermediateTip", "ThumbTip",
    "IndexFingerKnuckle", "IndexFingerIntermediateBase", "IndexFingerIntermediateTip", "IndexFingerTip",
    "MiddleFingerKnuckle", "MiddleFingerIntermediateBase", "MiddleFingerIntermediateTip", "MiddleFingerTip",
    "RingFingerKnuckle", "RingFingerIntermediateBase", "RingFingerIntermediateTip", "RingFingerTip",
    "LittleFingerKnuckle", "LittleFingerIntermediateBase", "LittleFingerIntermediateTip", "LittleFingerTip",
]
# Joints EgoDex also has that must not land anywhere.
EXTRA = ["IndexFingerMetacarpal", "MiddleFingerMetacarpal", "RingFingerMetacarpal", "LittleFingerMetacarpal",
         "Forearm"]


def pose(angle: float, translation) -> np.ndarray:
    """A rotation by `angle` about (1, 1, 1)/sqrt(3), then `translation`: [4, 4]."""
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    out[:3, 3] = translation
    return out


def joint_poses(side: int, index: int) -> np.ndarray:
    """Distinct [N, 4, 4] poses for joint `index` of hand `side` (metres, some rotation)."""
    return np.stack([pose(0.1 * f + 0.05 * index, (side + 0.01 * index, 0.001 * f, 0.5)) for f in range(N)])


def camera_poses() -> np.ndarray:
    return np.stack([pose(0.2 + 0.03 * f, (0.1 * f, 1.5, -0.2)) for f in range(N)])


def rgb(n: int = N) -> np.ndarray:
    """[n, 3] a colour per frame, 14 levels apart (n <= 16)."""
    return np.stack([(20 + 14 * f, 230 - 14 * f, 60 + 10 * f) for f in range(n)]).astype(np.uint8)


def colours(n: int = N) -> np.ndarray:
    """[n, H, W, 3] flat frames, a different colour each."""
    return np.broadcast_to(rgb(n)[:, None, None], (n, H, W, 3)).copy()


def write_episode(root, key="part1/basic_pick_place/0", *, frames=N, drop=(), confidence=None, attrs=None,
                  replace=None):
    """An EgoDex episode at root/key.{hdf5,mp4}; `drop` names datasets to leave out,
    `confidence` maps joint name -> [N] confidences (default all 0.9), `replace` maps dataset
    name -> the array to write instead."""
    path = os.path.join(root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path + ".hdf5", "w") as f:
        datasets = {"camera/intrinsic": K, "transforms/camera": camera_poses()}
        for side, prefix in enumerate(("left", "right")):
            for index, joint in enumerate(SLOTS + EXTRA):
                datasets[f"transforms/{prefix}{joint}"] = joint_poses(side, index)
                datasets[f"confidences/{prefix}{joint}"] = (confidence or {}).get(prefix + joint,
                                                                                np.full(N, 0.9))
        datasets.update(replace or {})
        for name, value in datasets.items():
            if name not in drop:
                f.create_dataset(name, data=np.asarray(value, np.float32))
        f.attrs.update(attrs or {"llm_type": "reset", "llm_description": "Pick up the cup. "})
    if frames:
        write_video(path + ".mp4", colours(frames))
    return key


def test_list_episodes_finds_every_hdf5_and_keys_round_trip(tmp_path):
    keys = [
        write_episode(tmp_path, "part1/basic_pick_place/0"),
        write_episode(tmp_path, "part1/basic_pick_place/1"),
        write_episode(tmp_path, "part2/charge_uncharge_airpods/0"),
        write_episode(tmp_path, "test/stack/3", frames=0),  # no mp4: listed, and refused when read
    ]
    (tmp_path / "part1" / "basic_pick_place" / "notes.txt").write_text("not an episode")
    assert egodex.list_episodes(str(tmp_path)) == sorted(keys)
    for key in keys[:3]:
        episode = egodex.read_episode(str(tmp_path), key)
        assert episode.episode_id == key
        assert episode.labels == {"task": key.split("/")[1]}
    with pytest.raises(EpisodeError, match="missing video"):
        egodex.read_episode(str(tmp_path), keys[3])


def test_keypoints_land_in_their_slots(tmp_path):
    episode = egodex.read_episode(str(tmp_path), write_episode(tmp_path))
    episode.check()
    assert (episode.source, episode.fps, episode.view) == ("egodex", 30.0, "head")
    assert episode.text == "Pick up the cup."
    np.testing.assert_allclose(episode.intrinsics, K)
    assert episode.hand_valid.all()
    for side in range(2):
        for slot in range(21):
            np.testing.assert_allclose(episode.hands[:, side, slot], joint_poses(side, slot), atol=1e-6)
    # The left index fingertip, spelled out: slot 8 of hand 0.
    np.testing.assert_allclose(episode.hands[:, 0, 8], joint_poses(0, SLOTS.index("IndexFingerTip")),
                               atol=1e-6)


def test_camera_is_a_rigid_world_from_camera_pose_in_opencv_axes(tmp_path):
    camera = egodex.read_episode(str(tmp_path), write_episode(tmp_path)).camera
    rotation = camera[:, :3, :3]
    np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (N, 3, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotation), 1, atol=1e-6)
    np.testing.assert_allclose(camera[:, 3], np.broadcast_to([0, 0, 0, 1], (N, 4)))
    # A point 0.5 m ahead, right of and below the optical axis, put into the world with the file's
    # pose, comes back at those camera coordinates and projects right of and below the centre,
    # as Apple's reprojection (cv2.projectPoints with the intrinsics) has it.
    in_camera = np.array([0.1, 0.05, 0.5, 1])
    in_world = camera_poses() @ in_camera
    back = np.einsum("nij,nj->ni", np.linalg.inv(camera), in_world)
    np.testing.assert_allclose(back, np.broadcast_to(in_camera, (N, 4)), atol=1e-5)
    pixel = K @ back[0, :3]
    np.testing.assert_allclose(pixel[:2] / pixel[2], [32 + 50 * 0.2, 24 + 50 * 0.1], atol=1e-3)


def test_low_confidence_invalidates_exactly_that_hand_frame(tmp_path):
    ring, wrist = np.full(N, 0.9), np.full(N, 0.9)
    ring[3], wrist[7] = 0.2, 0.0
    key = write_episode(tmp_path, confidence={"rightRingFingerIntermediateTip": ring, "leftHand": wrist})
    expected = np.ones((N, 2), bool)
    expected[3, 1] = expected[7, 0] = False
    np.testing.assert_array_equal(egodex.read_episode(str(tmp_path), key).hand_valid, expected)
    # The threshold is an option; a metacarpal (no slot of ours) never counts.
    metacarpal = np.zeros(N)
    key = write_episode(tmp_path, "part1/x/1", confidence={"rightRingFingerIntermediateTip": ring,
                                                           "leftIndexFingerMetacarpal": metacarpal})
    assert egodex.read_episode(str(tmp_path), key, min_confidence=0.1).hand_valid.all()


def test_non_finite_transforms_invalidate_that_hand_frame_and_never_leak(tmp_path):
    key = write_episode(tmp_path)
    with h5py.File(tmp_path / (key + ".hdf5"), "r+") as f:
        f["transforms/leftMiddleFingerTip"][4, 0, 3] = np.nan
    episode = egodex.read_episode(str(tmp_path), key)
    expected = np.ones((N, 2), bool)
    expected[4, 0] = False
    np.testing.assert_array_equal(episode.hand_valid, expected)
    assert np.isfinite(episode.hands).all()
    np.testing.assert_allclose(episode.hands[4, 0, 11], joint_poses(0, 11)[4], atol=1e-6)  # neighbour kept


def test_missing_confidences_count_as_confident(tmp_path):
    drop = [f"confidences/{side}{joint}" for side in ("left", "right") for joint in SLOTS + EXTRA]
    assert egodex.read_episode(str(tmp_path), write_episode(tmp_path, drop=drop)).hand_valid.all()


def test_missing_right_hand_is_invalid_throughout_with_a_warning(tmp_path, caplog):
    key = write_episode(tmp_path, drop=["transforms/rightThumbTip", "transforms/rightHand"])
    with caplog.at_level(logging.WARNING, logger=egodex.__name__):
        episode = egodex.read_episode(str(tmp_path), key)
    episode.check()
    assert episode.hand_valid[:, 0].all() and not episode.hand_valid[:, 1].any()
    assert np.isfinite(episode.hands).all()
    assert key in caplog.text and "rightThumbTip" in caplog.text


@pytest.mark.parametrize(
    "broken, reason",
    [
        (dict(frames=0), "missing video"),
        (dict(drop=["transforms/camera"]), "no transforms/camera"),
        (dict(replace={"transforms/camera": np.zeros((0, 4, 4))}), f"the mp4 has {N} frames and the hdf5 0 poses"),
    ],
)
def test_broken_episodes_raise_with_the_reason(tmp_path, broken, reason):
    key = write_episode(tmp_path, **broken)
    with pytest.raises(EpisodeError, match=reason) as error:
        egodex.read_episode(str(tmp_path), key)
    assert key in str(error.value)


@pytest.mark.parametrize(
    "attrs, text",
    [
        ({"llm_type": "reversible", "which_llm_description": "1", "llm_description": "Plug in the charger.",
          "llm_description2": "Unplug the charger."}, "Plug in the charger."),
        ({"llm_type": "reversible", "which_llm_description": b"2", "llm_description": "Plug in the charger.",
          "llm_description2": "Unplug the charger."}, "Unplug the charger."),
        ({"llm_type": "reset", "which_llm_description": "2", "llm_description": "Stack the cups."},
         "Stack the cups."),
        ({"description": "pick place"}, "pick place"),
        ({}, "charge uncharge airpods"),
    ],
)
def test_text_follows_the_description_attributes(tmp_path, attrs, text):
    key = write_episode(tmp_path, "part2/charge_uncharge_airpods/0", attrs=attrs or {"session_name": "s"})
    assert egodex.read_episode(str(tmp_path), key).text == text


def test_frames_read_back(tmp_path):
    frames = egodex.read_episode(str(tmp_path), write_episode(tmp_path)).frames
    assert len(frames) == N
    got = frames.read(np.arange(N)).astype(float)
    assert got.shape == (N, H, W, 3)
    assert np.abs(got - colours()).mean(axis=(1, 2, 3)).max() < 8


# The published files' defects (github.com/apple/ml-egodex issues): each converts, with action
# chunks equal to those computed here from the arrays written, and a warning in summary.json.

OPTIONS = convert.ConvertOptions(horizon=4, stride=2, jpeg_short_side=32)


def expected_chunks(n: int) -> dict[int, np.ndarray]:
    """Anchor frame -> camera-frame poses [T+1, 2, 21, 4, 4] of the first `n` frames as written
    (float32 in the file), the anchor's camera inverted: what each record must hold."""
    T, stride = OPTIONS.horizon, OPTIONS.stride
    hands = np.stack([np.stack([joint_poses(side, slot) for slot in range(21)], axis=1) for side in range(2)], axis=1)
    hands, camera = hands.astype(np.float32).astype(np.float64), camera_poses().astype(np.float32).astype(np.float64)
    return {a: np.linalg.inv(camera[a]) @ hands[a:a + T + 1] for a in range(0, n - T, stride)}


def assert_converts_exactly(root, key: str, n: int) -> list[str]:
    """Converts `key` as caip-make-records does; its records are the anchors of the first `n`
    frames with their own frame and the expected poses. Returns the episode's warnings."""
    result = convert.read_and_convert("egodex", str(root), {}, OPTIONS, key)
    assert isinstance(result, convert.EpisodeResult), result
    samples = [records.decode(r) for r in result.records]
    expected = expected_chunks(n)
    assert [s["frame_index"] for s in samples] == list(expected)
    for sample in samples:
        # To 1e-4 (rotation entries; metres): the records' quantisation is under 0.03 mm and 0.01 degrees.
        stored = actions.decompress_poses(sample["poses"])
        np.testing.assert_allclose(stored, expected[sample["frame_index"]], atol=1e-4)
        assert sample["valid"].all()
        shown = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"), float).mean(axis=(0, 1))
        assert np.abs(rgb(16).astype(float) - shown).sum(axis=1).argmin() == sample["frame_index"]
    return result.warnings


@pytest.mark.parametrize("intrinsic", [np.zeros((0, 3)), None, np.zeros((3, 3))], ids=["empty", "absent", "zeros"])
def test_unusable_intrinsics_become_egodex_s_fixed_ones(tmp_path, intrinsic):
    """Issue 10: part1's camera/intrinsic has shape (0, 3); issue 3: older downloads lack it.
    Apple's loader reads the empty one as it is; Apple's get_camera_intrinsics gives the constant."""
    drop, replace = (["camera/intrinsic"], None) if intrinsic is None else ((), {"camera/intrinsic": intrinsic})
    key = write_episode(tmp_path, drop=drop, replace=replace)
    warnings = assert_converts_exactly(tmp_path, key, N)
    assert len(warnings) == 1 and key in warnings[0] and "camera/intrinsic" in warnings[0]
    fixed = np.array([[736.6339, 0, 960], [0, 736.6339, 540], [0, 0, 1]])  # README / data_utils.py
    np.testing.assert_allclose(egodex.read_episode(str(tmp_path), key).intrinsics, fixed)
    sample = records.decode(convert.read_and_convert("egodex", str(tmp_path), {}, OPTIONS, key).records[0])
    np.testing.assert_allclose(sample["intrinsics"], fixed * [[32 / H], [32 / H], [1]], rtol=1e-6)


def test_reversible_task_without_which_llm_description_gets_its_task_name(tmp_path):
    """Issues 3 and 8: downloads from before about August 2025 lack which_llm_description.
    Apple's loader raises KeyError; either description would be the wrong direction half the time."""
    attrs = {"llm_type": "reversible", "llm_description": "Plug in the charger.",
             "llm_description2": "Unplug the charger."}
    key = write_episode(tmp_path, "part2/charge_uncharge_airpods/3", attrs=attrs)
    warnings = assert_converts_exactly(tmp_path, key, N)
    assert egodex.read_episode(str(tmp_path), key).text == "charge uncharge airpods"
    assert len(warnings) == 1 and key in warnings[0] and "which_llm_description" in warnings[0]
    # A task that is not reversible needs no direction: its description, no warning.
    key = write_episode(tmp_path, "part2/stack_cups/0", attrs={"llm_type": "reset", "llm_description": "Stack."})
    assert egodex.read_episode(str(tmp_path), key).text == "Stack." and not assert_converts_exactly(tmp_path, key, N)


@pytest.mark.parametrize(
    "written, n, counts",
    [
        (dict(frames=N + 3), N, f"the mp4 has {N + 3} frames, the hdf5 {N} poses"),
        (dict(frames=N - 3), N - 3, f"the mp4 has {N - 3} frames, the hdf5 {N} poses"),
        (dict(replace={"transforms/rightRingFingerTip": joint_poses(1, 16)[:N - 2],
                       "confidences/leftHand": np.full(N - 1, 0.9)}), N - 2,
         f"the hdf5 {N} poses (but confidences/leftHand {N - 1}, transforms/rightRingFingerTip {N - 2})"),
    ],
    ids=["longer_video", "shorter_video", "shorter_datasets"],
)
def test_frames_and_poses_of_other_counts_pair_frame_i_with_pose_i(tmp_path, written, n, counts):
    """Apple's loader serves frame i with pose i for every i both have: so does this reader."""
    key = write_episode(tmp_path, **written)
    warnings = assert_converts_exactly(tmp_path, key, n)
    assert len(warnings) == 1 and warnings[0].startswith(key) and counts in warnings[0]
    assert f"using the first {n} of each" in warnings[0]


def test_summary_lists_the_warnings_by_episode(tmp_path):
    good = write_episode(tmp_path / "in", "part1/a/0")
    bad = write_episode(tmp_path / "in", "part1/a/1", replace={"camera/intrinsic": np.zeros((0, 3))})
    summary = convert.convert("egodex", str(tmp_path / "in"), str(tmp_path / "out"), OPTIONS, shards=1)
    assert summary["episodes_converted"] == 2 and summary["episodes_with_warnings"] == 1
    assert list(summary["warnings"]) == [bad] and good not in summary["warnings"]
    assert records.read_json(str(tmp_path / "out"), "summary.json")["warnings"] == summary["warnings"]
