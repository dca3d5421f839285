"""The demo world: deterministic, consistent geometry (poses, projection, masks) and an action
that the instruction and the image determine."""
import collections
import dataclasses

import numpy as np
import pytest

from caip_jax.data.schema import EpisodeError
from caip_jax.data.sources import demo_world as dw

SIZE, FRAMES = 128, 96
KEYS = dw.list_episodes(num_episodes=64, seed=0)


@pytest.fixture(scope="module")
def episodes():
    """The first 8 episodes of seed 0, read once."""
    return [dw.read_episode("", key) for key in KEYS[:8]]


def _geometry(key):
    """The spec and the geometry of the episode at `key`."""
    spec = dw.episode_spec(*dw.parse_key(key))
    return spec, dw.episode_geometry(spec, FRAMES)


def _uv(point, camera, intrinsics):
    """World point [3] -> (u, v) pixel coordinates, through inv(world-from-camera) and K."""
    local = np.linalg.inv(camera) @ np.append(point, 1.0)
    u, v, w = intrinsics @ local[:3]
    assert w > 0, "behind the camera"
    return u / w, v / w


def _pixel(point, camera, intrinsics):
    """World point [3] -> (row, col) of the pixel it falls in (pixel centres at integers)."""
    u, v = _uv(point, camera, intrinsics)
    return int(round(v)), int(round(u))


def _assert_rigid(poses):
    rotations = poses[..., :3, :3].astype(np.float64)
    eye = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations @ np.swapaxes(rotations, -1, -2), eye, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-5)
    np.testing.assert_array_equal(poses[..., 3, :], np.broadcast_to([0, 0, 0, 1], poses.shape[:-2] + (4,)))


def test_keys_and_bad_key():
    assert KEYS == sorted(KEYS) and len(set(KEYS)) == 64 and KEYS[17] == "demo_s0_000017"
    assert dw.list_episodes(num_episodes=2, seed=5) == ["demo_s5_000000", "demo_s5_000001"]
    with pytest.raises(EpisodeError, match="not a demo world key"):
        dw.read_episode("", "demo_0017")


def test_same_key_gives_the_same_episode_and_other_keys_differ(episodes):
    again = dw.read_episode("", KEYS[0])
    first = episodes[0]
    np.testing.assert_array_equal(again.frames.array, first.frames.array)
    np.testing.assert_array_equal(again.hands, first.hands)
    np.testing.assert_array_equal(again.camera, first.camera)
    assert (again.text, again.labels) == (first.text, first.labels)
    masks = dw.render_masks("", KEYS[0], [0, 50])
    np.testing.assert_array_equal(masks, dw.render_masks("", KEYS[0], [0, 50]))
    other = episodes[1]
    assert not np.array_equal(other.frames.array, first.frames.array)
    assert not np.allclose(other.hands, first.hands)
    assert not np.allclose(other.camera, first.camera)
    # the key carries the seed: a different seed is a different world
    assert not np.array_equal(dw.read_episode("", "demo_s1_000000").frames.array[0], first.frames.array[0])


def test_episode_passes_check_and_has_what_the_brief_says(episodes):
    for ep in episodes:
        ep.check()
        assert ep.source == "demo_world" and ep.view == "head" and ep.fps == 30.0
        assert ep.frames.array.shape == (FRAMES, SIZE, SIZE, 3) and ep.frames.array.dtype == np.uint8
        assert ep.hand_valid.dtype == bool and ep.intrinsics.shape == (3, 3)
        assert ep.frames.array.std() > 10, "frames are not blank"
    small = dw.read_episode("", KEYS[0], image_size=64, num_frames=10, fps=15.0)
    small.check()
    assert small.frames.array.shape == (10, 64, 64, 3) and small.fps == 15.0
    np.testing.assert_allclose(small.intrinsics[:2, 2], 31.5)


def test_hand_and_camera_poses_are_rigid(episodes):
    for ep in episodes:
        _assert_rigid(ep.hands)
        _assert_rigid(ep.camera)


def test_hand_skeleton_is_a_plausible_hand(episodes):
    hands = episodes[0].hands[..., :3, 3]  # [N, 2, 21, 3]
    bases = (1, 5, 9, 13, 17)
    bones = [(0, b) for b in bases] + [(b + j, b + j + 1) for b in bases for j in range(3)]
    lengths = np.stack([np.linalg.norm(hands[..., i, :] - hands[..., j, :], axis=-1) for i, j in bones], -1)
    assert lengths.min() > 0.015 and lengths.max() < 0.1  # centimetres, not millimetres or metres
    np.testing.assert_allclose(lengths, np.broadcast_to(lengths[:1, :1], lengths.shape), atol=1e-5)  # rigid
    # the left hand's thumb is on its right when the palm is down, and the right hand's on its left
    for hand, side in ((0, 1), (1, -1)):
        x_axis = episodes[0].hands[0, hand, 0, :3, 0]
        thumb = hands[0, hand, 4] - hands[0, hand, 20]  # thumb tip relative to the little fingertip
        assert side * np.cross(x_axis, thumb)[2] < 0


def test_hands_stay_above_the_table():
    for key in KEYS[:32]:
        _, geometry = _geometry(key)
        assert geometry.hands[..., 2, 3].min() > -0.01, key


def test_keypoints_project_onto_the_hand_mask(episodes):
    """Every keypoint of a visible hand (wrist, joints, tips) lands on a hand pixel: the drawing,
    the poses, the camera and the intrinsics agree to within a pixel or two."""
    checked = 0
    for ep in episodes:
        frames = np.arange(0, FRAMES, 19)
        masks = dw.render_masks("", ep.episode_id, frames)
        for mask, i in zip(masks, frames):
            for hand, keypoint in np.ndindex(2, 21):
                if not ep.hand_valid[i, hand]:
                    continue
                row, col = _pixel(ep.hands[i, hand, keypoint, :3, 3], ep.camera[i], ep.intrinsics)
                if 0 <= row < SIZE and 0 <= col < SIZE:
                    assert mask[row, col] == dw.MASK_HAND, (ep.episode_id, i, hand, keypoint)
                    checked += keypoint == 0
    assert checked > 50  # wrists


def test_object_centres_project_onto_their_masks():
    for key in KEYS[:32]:
        spec, geometry = _geometry(key)
        camera, intrinsics = geometry.camera[0], dw.intrinsics(SIZE)
        mask = dw.render_masks("", key, [0])[0]
        for j in range(len(spec.objects)):
            row, col = _pixel(geometry.objects[0, j], camera, intrinsics)
            assert mask[row, col] == (dw.MASK_TARGET if j == spec.target else dw.MASK_OTHER), (key, j)
        assert set(np.unique(mask)) == {0, 1, 2, 3}
        rows, cols = np.nonzero(mask == dw.MASK_TARGET)  # the target's silhouette is centred on it
        u, v = _uv(geometry.objects[0, spec.target], camera, intrinsics)
        assert np.hypot(cols.mean() - u, rows.mean() - v) < 1.5, key


def test_masks_agree_with_frames(episodes):
    palette = np.array(list(dw.COLOURS.values()), float)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    for ep in episodes[:4]:
        spec = dw.episode_spec(*dw.parse_key(ep.episode_id))
        masks = dw.render_masks("", ep.episode_id, [0, 40, 80])
        for mask, frame in zip(masks, ep.frames.read([0, 40, 80]).astype(float)):
            skin = frame[mask == dw.MASK_HAND]
            assert (skin[:, 0] > skin[:, 2] + 20).mean() > 0.9  # hands are skin-coloured
            seen = frame[mask == dw.MASK_TARGET].mean(0)  # shaded, but of the target's hue
            assert list(dw.COLOURS)[np.argmax(palette @ seen)] == spec.objects[spec.target].colour


def test_named_hand_reaches_the_target_and_the_other_rests():
    for key in KEYS:
        spec, geometry = _geometry(key)
        wrist = geometry.hands[:, spec.hand, 0, :3, 3]
        target = geometry.objects[:, spec.target]
        start, end = np.linalg.norm(wrist[0] - target[0]), np.linalg.norm(wrist[-1] - target[-1])
        assert end < 0.7 * start and end < 0.2, (key, start, end)
        keypoints = geometry.hands[:, spec.hand, :, :3, 3]
        assert np.linalg.norm(keypoints - target[:, None], axis=-1).min() < 0.05, key  # it gets there
        if spec.missing is None:
            idle = geometry.hands[:, 1 - spec.hand, 0, :3, 3]
            assert np.linalg.norm(idle - idle[0], axis=-1).max() < 0.04, key
            assert geometry.hand_valid.all()
        others = np.delete(geometry.objects, spec.target, axis=1)
        np.testing.assert_array_equal(others, np.broadcast_to(others[:1], others.shape))  # only the target


def test_verbs_move_the_target_as_they_say():
    moved = collections.defaultdict(list)
    for key in KEYS:
        spec, geometry = _geometry(key)
        moved[spec.verb].append(geometry.objects[-1, spec.target] - geometry.objects[0, spec.target])
    lift = np.array(moved["pick up"])
    push = np.array(moved["push"])
    assert (lift[:, 2] > 0.05).all()  # picked up: off the table
    assert (np.abs(push[:, 2]) < 1e-9).all() and (np.linalg.norm(push[:, :2], axis=1) > 0.05).all()  # slid
    np.testing.assert_array_equal(moved["touch"], 0.0)  # touched: stays


def test_missing_hands_occur_and_are_not_drawn():
    missing = [key for key in KEYS if dw.episode_spec(*dw.parse_key(key)).missing is not None]
    assert 2 <= len(missing) <= 25
    hidden_pixels = 0
    for key in missing[:4]:
        spec, geometry = _geometry(key)
        assert geometry.hand_valid[:, spec.hand].all() and not geometry.hand_valid[:, 1 - spec.hand].all()
        gap = np.flatnonzero(~geometry.hand_valid[:, 1 - spec.hand])
        for i in gap:  # the idle hand has left: its wrist is below the bottom of the image
            wrist = geometry.hands[i, 1 - spec.hand, 0, :3, 3]
            assert _uv(wrist, geometry.camera[i], dw.intrinsics(SIZE))[1] > SIZE
        frames = gap[:3]
        masks = dw.render_masks("", key, frames)
        shown = dataclasses.replace(geometry, hand_valid=np.ones_like(geometry.hand_valid))
        _, masks_if_shown = dw._render(spec, shown, frames, SIZE, rgb=False)
        hand, hand_if_shown = masks == dw.MASK_HAND, masks_if_shown == dw.MASK_HAND
        assert not (hand & ~hand_if_shown).any()
        hidden_pixels += (hand_if_shown & ~hand).sum()
    assert hidden_pixels > 0  # the invalid hand would have been in view there: it was left out


def test_instruction_matches_labels_and_labels_vary():
    counts = collections.defaultdict(collections.Counter)
    for key in KEYS:
        spec = dw.episode_spec(*dw.parse_key(key))
        labels = spec.labels
        assert spec.text == f"{labels['verb']} the {labels['target']} with the {labels['hand']} hand"
        names = [o.name for o in spec.objects]
        assert len(set(names)) == len(names) and names[spec.target] == labels["target"]  # unambiguous
        for name, value in labels.items():
            counts[name][value] += 1
        counts["colour"][spec.objects[spec.target].colour] += 1
        counts["shape"][spec.objects[spec.target].shape] += 1
    assert set(counts["verb"]) == set(dw.VERBS) and min(counts["verb"].values()) >= 10
    assert set(counts["hand"]) == {"left", "right"} and min(counts["hand"].values()) >= 20
    assert len(counts["target"]) >= 10 and max(counts["target"].values()) <= 12
    assert len(counts["colour"]) == 4 and len(counts["shape"]) == 3
    ep = dw.read_episode("", KEYS[3], num_frames=4)
    assert ep.text == dw.episode_spec(0, 3).text and ep.labels == dw.episode_spec(0, 3).labels


def test_camera_looks_down_at_the_table_and_moves_a_little(episodes):
    camera = episodes[0].camera.astype(np.float64)
    forward, position = camera[:, :3, 2], camera[:, :3, 3]
    assert (forward[:, 2] < -0.7).all()  # looking down
    distance = -position[:, 2] / forward[:, 2]  # along the optical axis to the table
    assert (np.abs(distance - 0.6) < 0.1).all()
    travel = np.linalg.norm(position - position[0], axis=1).max()
    turn = np.degrees(np.arccos(np.clip(forward @ forward[0], -1, 1))).max()
    assert 0.002 < travel < 0.05 and 0.1 < turn < 5
