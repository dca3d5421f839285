"""Action chunks against hand-built rotations and motions: deltas, frames, masks, resampling,
validity, normalisation and compact storage."""
import numpy as np
import pytest

from caip_jax import actions
from caip_jax.data import records

IDENTITY_6D = [1, 0, 0, 0, 1, 0]


def axis_angle(axis, angle):
    """Rodrigues' formula: unit axis [..., 3], angle [...] (radians) -> rotation [..., 3, 3]."""
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis, axis=-1, keepdims=True)
    angle = np.asarray(angle, np.float64)[..., None, None]
    x, y, z = np.moveaxis(axis, -1, 0)
    zero = np.zeros_like(x)
    rows = [[zero, -z, y], [z, zero, -x], [-y, x, zero]]
    k = np.stack([np.stack(row, -1) for row in rows], -2)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def rot_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def pose(rot=np.eye(3), trans=(0, 0, 0)):
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, trans
    return out


def all_keypoints(poses):
    """One pose per step [K, 4, 4] -> the same pose for both hands and all keypoints."""
    return np.broadcast_to(np.asarray(poses)[:, None, None], (len(poses), 2, 21, 4, 4)).copy()


def random_poses(rng, shape):
    rot = axis_angle(rng.normal(size=shape + (3,)), rng.uniform(0, np.pi, shape))
    out = np.broadcast_to(np.eye(4), shape + (4, 4)).copy()
    out[..., :3, :3], out[..., :3, 3] = rot, rng.uniform(-1, 1, shape + (3,))
    return out


def all_valid(steps):
    return np.ones((steps, 2), bool)


def six_d(rot):
    return np.concatenate([rot[:, 0], rot[:, 1]])


def rotations_from_6d(six):
    """[..., 6] -> [..., 3, 3], completing the frame with the cross product."""
    c0, c1 = six[..., :3].astype(np.float64), six[..., 3:].astype(np.float64)
    return np.stack([c0, c1, np.cross(c0, c1)], -1)


def rotation_error(six_a, six_b):
    """Angle (radians) between the rotations of two 6D arrays; exact for small angles, unlike the
    arccos of the trace: ||Ra - Rb||_F = 2 sqrt(2) sin(angle / 2)."""
    frobenius = np.linalg.norm(rotations_from_6d(six_a) - rotations_from_6d(six_b), axis=(-2, -1))
    return 2 * np.arcsin(np.minimum(frobenius / (2 * np.sqrt(2)), 1))


# --- rotations --------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [0.0, 30.0, 90.0, 179.9999, 180.0])
def test_quaternion_matches_axis_angle_at_every_angle(degrees):
    axes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, -2, 0.5], [-0.3, 0.1, -1]], np.float64)
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    rot = axis_angle(axes, np.full(len(axes), np.radians(degrees)))
    half = np.radians(degrees) / 2
    want = np.concatenate([np.full((len(axes), 1), np.cos(half)), np.sin(half) * axes], -1)
    q = actions.matrix_to_quat(rot)
    # At 180 degrees w = 0 and q, -q are equally canonical.
    np.testing.assert_allclose(np.abs(np.sum(q * want, -1)), 1, atol=1e-12)
    np.testing.assert_allclose(actions.quat_to_matrix(q), rot, atol=1e-12)
    if degrees < 180:
        np.testing.assert_allclose(actions.quat_to_rotvec(q), axes * np.radians(degrees), atol=1e-9)
        rotvec = axes * np.radians(degrees)
        np.testing.assert_allclose(actions.rotvec_to_quat(rotvec), want, atol=1e-12)


def test_slerp_takes_the_shorter_arc():
    q0 = actions.matrix_to_quat(np.eye(3))
    q1 = -actions.matrix_to_quat(rot_z(90))  # the same rotation, on the far hemisphere
    for t, degrees in [(0.0, 0), (0.5, 45), (0.25, 22.5), (1.0, 90)]:
        got = actions.quat_to_matrix(actions.slerp(q0, q1, t))
        np.testing.assert_allclose(got, rot_z(degrees), atol=1e-12)


def test_camera_frame_is_the_inverse_camera_times_the_pose():
    rng = np.random.default_rng(0)
    hands, camera = random_poses(rng, (3, 2, 21)), random_poses(rng, ())
    np.testing.assert_allclose(actions.se3_inverse(camera) @ camera, np.eye(4), atol=1e-12)
    got = actions.to_camera_frame(hands, camera)
    np.testing.assert_allclose(got, np.linalg.inv(camera) @ hands, atol=1e-12)


# --- action chunks ----------------------------------------------------------------------------


@pytest.mark.parametrize("delta", ["anchor", "step"])
def test_identity_motion_is_zero_translation_and_identity_rotation(delta):
    still = np.broadcast_to(random_poses(np.random.default_rng(1), (2, 21)), (5, 2, 21, 4, 4))
    action, mask = actions.action_chunk(still, all_valid(5), delta)
    assert action.shape == (4, 2, 21, 9) and action.dtype == np.float32 and mask.all()
    np.testing.assert_allclose(action[..., :3], 0, atol=1e-7)
    np.testing.assert_allclose(action[..., 3:], IDENTITY_6D + np.zeros((4, 2, 21, 6)), atol=1e-7)


def test_pure_translation_in_both_modes():
    rot = axis_angle([1, 2, 3], 0.7)  # the keypoints' own orientation must not leak in
    velocity = np.array([0.01, -0.02, 0.005])
    chunk = all_keypoints([pose(rot, [0.1, 0.2, 0.5] + k * velocity) for k in range(4)])
    anchor, _ = actions.action_chunk(chunk, all_valid(4), "anchor")
    step, _ = actions.action_chunk(chunk, all_valid(4), "step")
    want = np.arange(1, 4)[:, None, None, None] * velocity + np.zeros((3, 2, 21, 3))
    np.testing.assert_allclose(anchor[..., :3], want, atol=1e-7)
    np.testing.assert_allclose(step[..., :3], np.broadcast_to(velocity, (3, 2, 21, 3)), atol=1e-7)
    np.testing.assert_allclose(anchor[..., 3:], IDENTITY_6D + np.zeros((3, 2, 21, 6)), atol=1e-7)


def test_rotation_about_z_by_30_degrees_per_step():
    start = axis_angle([0.2, -1, 0.4], 2.0)  # R_k = Rz(30 k) R_0: the delta is Rz(30 k), any R_0
    chunk = all_keypoints([pose(rot_z(30 * k) @ start, [0.3, 0.1, 0.8]) for k in range(4)])
    anchor, _ = actions.action_chunk(chunk, all_valid(4), "anchor")
    step, _ = actions.action_chunk(chunk, all_valid(4), "step")
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    want = [c, s, 0, -s, c, 0] + np.zeros((3, 2, 21, 6))
    np.testing.assert_allclose(step[..., 3:], want, atol=1e-6)
    for k in range(1, 4):
        want = six_d(rot_z(30 * k)) + np.zeros((2, 21, 6))
        np.testing.assert_allclose(anchor[k - 1, ..., 3:], want, atol=1e-6)
    np.testing.assert_allclose(anchor[..., :3], 0, atol=1e-7)


@pytest.mark.parametrize("delta", ["anchor", "step"])
def test_moving_camera_and_hands_by_one_world_transform_leaves_the_chunk(delta):
    rng = np.random.default_rng(2)
    hands, camera = random_poses(rng, (6, 2, 21)), random_poses(rng, ())
    world = random_poses(rng, ())
    want, _ = actions.action_chunk(actions.to_camera_frame(hands, camera), all_valid(6), delta)
    moved = actions.to_camera_frame(world @ hands, world @ camera)
    got, _ = actions.action_chunk(moved, all_valid(6), delta)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_head_motion_after_the_anchor_cancels():
    # The hand moves 10 cm along world x and turns 30 degrees about world z while the head turns
    # and walks: only the camera at the anchor may define the frame.
    tilt = axis_angle([1, 0, 0], np.pi / 2)
    camera = np.stack([pose(tilt @ rot_z(20 * k), [0.05 * k, 0, 1.6]) for k in range(3)])
    hands = all_keypoints([pose(rot_z(30 * k), [0.1 * k, 0.5, 1.0]) for k in range(3)])
    action, _ = actions.action_chunk(actions.to_camera_frame(hands, camera[0]), all_valid(3))
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    # The anchor camera's x, y axes are world x, z: the turn is Ry(30) in the camera frame.
    np.testing.assert_allclose(action[0, 0, 0], [0.1, 0, 0, c, 0, -s, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(action[1, 0, 0, :3], [0.2, 0, 0], atol=1e-6)


def test_mask_rule_and_masked_zeros_with_missing_hands():
    rng = np.random.default_rng(3)
    poses = random_poses(rng, (5, 2, 21))
    valid = all_valid(5)
    valid[2, 0] = False  # left hand missing at step 2
    valid[0, 1] = False  # right hand missing at the anchor
    broken = poses.copy()
    broken[~valid] = np.nan
    expected_mask = {
        "anchor": [[True, False], [False, False], [True, False], [True, False]],
        "step": [[True, False], [False, True], [False, True], [True, True]],
    }
    for delta, want_mask in expected_mask.items():
        action, mask = actions.action_chunk(broken, valid, delta)
        clean, _ = actions.action_chunk(poses, all_valid(5), delta)
        np.testing.assert_array_equal(mask, want_mask)
        assert np.isfinite(action).all()
        np.testing.assert_array_equal(action[~mask], 0)
        np.testing.assert_allclose(action[mask], clean[mask], atol=1e-6)


def test_unknown_delta_names_the_value():
    with pytest.raises(ValueError, match="'velocity'"):
        actions.action_chunk(np.broadcast_to(np.eye(4), (3, 2, 21, 4, 4)), all_valid(3), "velocity")


def test_anchor_indices_need_a_full_future():
    np.testing.assert_array_equal(actions.anchor_indices(10, 3), [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(actions.anchor_indices(10, 3, stride=4), [0, 4])
    assert len(actions.anchor_indices(3, 3)) == 0 and len(actions.anchor_indices(0, 3)) == 0


# --- resampling -------------------------------------------------------------------------------


def test_resampling_at_the_same_rate_returns_the_inputs():
    rng = np.random.default_rng(4)
    hands, camera = random_poses(rng, (4, 2, 21)).astype(np.float32), random_poses(rng, (4,))
    hands[1, 0, 3] = np.nan
    valid = rng.random((4, 2)) > 0.3
    out = actions.resample(hands, valid, camera, fps=30.0)
    assert out.hands is hands and out.hand_valid is valid and out.camera is camera
    np.testing.assert_array_equal(out.source_index, [0, 1, 2, 3])


def test_resampling_60_to_30_hz_takes_every_other_frame_exactly():
    rng = np.random.default_rng(5)
    hands, camera = random_poses(rng, (10, 2, 21)).astype(np.float32), random_poses(rng, (10,))
    valid = rng.random((10, 2)) > 0.3
    out = actions.resample(hands, valid, camera, fps=60.0)
    # (10 - 1) / 60 s holds 30 Hz samples 0..4 (4 / 30 <= 9 / 60 < 5 / 30).
    np.testing.assert_array_equal(out.source_index, [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(out.hands[out.hand_valid], hands[::2][valid[::2]])
    assert out.hands.dtype == np.float32
    np.testing.assert_array_equal(out.camera, camera[::2])
    np.testing.assert_array_equal(out.hand_valid, valid[::2])


def test_resampling_15_to_30_hz_interpolates_midpoints_on_the_shorter_arc():
    # Source frames: 170 degrees about z, then -170 (20 degrees further on the shorter arc).
    hands = all_keypoints(
        [pose(rot_z(170), [0.0, 0.2, 0.4]), pose(rot_z(-170), [0.2, 0.0, 1.0]), pose()]
    )
    camera = np.stack([pose(), pose(rot_z(80), [1.0, 0.0, 0.0]), pose()])
    valid = np.array([[True, True], [True, False], [True, True]])
    out = actions.resample(hands, valid, camera, fps=15.0)
    assert len(out.hands) == 5
    np.testing.assert_allclose(out.hands[1, 0, 0], pose(rot_z(180), [0.1, 0.1, 0.7]), atol=1e-12)
    np.testing.assert_allclose(out.camera[1], pose(rot_z(40), [0.5, 0.0, 0.0]), atol=1e-12)
    np.testing.assert_array_equal(out.hands[2, 0], hands[1, 0])
    np.testing.assert_array_equal(out.hand_valid, [[1, 1], [1, 0], [1, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(out.source_index, [0, 0, 1, 1, 2])  # ties take the earlier frame


def test_resampling_20_to_30_hz_weights_and_end():
    # (3 - 1) / 20 = 0.1 s holds 30 Hz samples 0..3, at source frames 0, 2/3, 4/3 and 2.
    x = np.array([0.0, 1.0, 3.0])
    hands = all_keypoints([pose(trans=[v, 0, 0]) for v in x])
    camera = np.stack([pose(trans=[0, v, 0]) for v in x])
    out = actions.resample(hands, all_valid(3), camera, fps=20.0)
    np.testing.assert_allclose(out.hands[:, 1, 20, 0, 3], [0, 2 / 3, 1 + 2 / 3, 3], atol=1e-12)
    np.testing.assert_allclose(out.camera[:, 1, 3], [0, 2 / 3, 1 + 2 / 3, 3], atol=1e-12)
    np.testing.assert_array_equal(out.source_index, [0, 1, 1, 2])


# --- validity ---------------------------------------------------------------------------------


def test_rigid_mask_rejects_nan_scaled_reflected_and_projective_poses():
    good = pose(axis_angle([1, 1, 0], 1.0), [0.3, -0.2, 0.9])
    nan, inf, scaled, reflected, projective, noisy = (good.copy() for _ in range(6))
    nan[0, 3] = np.nan
    inf[1, 1] = np.inf
    scaled[:3, :3] *= 1.01
    reflected[:3, 2] *= -1
    projective[3, 0] = 0.1
    noisy[:3, :3] += 1e-5  # within atol
    mask = actions.rigid_mask(np.stack([good, nan, inf, scaled, reflected, projective, noisy]))
    np.testing.assert_array_equal(mask, [True, False, False, False, False, False, True])


def test_sanitize_invalidates_and_counts_hand_frames():
    hands = random_poses(np.random.default_rng(6), (4, 2, 21))
    valid = all_valid(4)
    hands[1, 0, 7, 2, 2] = np.nan  # one keypoint spoils its hand-frame
    hands[2, 1, :, :3, 0] *= -1  # reflections
    hands[3, 0] = np.nan
    valid[3, 0] = False  # already invalid: not counted again
    out, dropped = actions.sanitize(valid, hands)
    want = all_valid(4)
    want[1, 0] = want[2, 1] = want[3, 0] = False
    np.testing.assert_array_equal(out, want)
    assert dropped == 2


# --- normalisation ----------------------------------------------------------------------------


def test_normalize_round_trip_and_masked_zeros():
    rng = np.random.default_rng(7)
    action = rng.normal(size=(3, 4, 2, 21, 9)).astype(np.float32)
    mask = rng.random((3, 4, 2)) > 0.3
    mean, std = rng.normal(size=(2, 21, 9)), rng.uniform(0.5, 2, (2, 21, 9))
    std[1, 4, 2] = 0  # a constant dimension: centred, not divided
    norm = actions.normalize(action, mask, mean, std)
    assert norm.dtype == np.float32
    np.testing.assert_array_equal(norm[~mask], 0)
    want = (action.astype(np.float64) - mean) / np.where(std == 0, 1, std)
    np.testing.assert_allclose(norm[mask], want[mask], rtol=1e-5, atol=1e-6)
    back = actions.denormalize(norm, mask, mean, std)
    np.testing.assert_array_equal(back[~mask], 0)
    np.testing.assert_allclose(back[mask], action[mask], rtol=1e-5, atol=1e-5)


# --- compact storage --------------------------------------------------------------------------


def hand_motion(rng, steps=65):
    """Realistic chunk [steps, 2, 21, 4, 4] in a camera frame: wrists 0.2-1.5 m in front of the
    camera travel up to ~0.7 m and turn up to 180 degrees; fingers curl and uncurl."""
    s = np.linspace(0, 1, steps)[:, None]  # [steps, 1] over hands
    direction = np.concatenate([rng.uniform(-0.5, 0.5, (2, 2)), np.ones((2, 1))], -1)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    start = direction * rng.uniform(0.2, 1.5, (2, 1))
    wrist_t = start + (3 * s**2 - 2 * s**3)[..., None] * rng.uniform(-0.4, 0.4, (2, 3))
    wrist_t += 0.02 * np.sin(2 * np.pi * rng.uniform(1, 3) * s)[..., None]
    turn = axis_angle(rng.normal(size=(2, 3)), np.radians(rng.uniform(90, 180, 2)) * s)
    wrist_r = turn @ axis_angle(rng.normal(size=(2, 3)), rng.uniform(0, np.pi, 2))
    offset = rng.uniform(-0.1, 0.1, (2, 21, 3))  # keypoints in the wrist frame
    bend = 1.2 * np.sin(np.pi * s)[..., None] * rng.uniform(0, 1, (2, 21))  # [steps, 2, 21]
    curl = axis_angle(np.broadcast_to([1, 0, 0], bend.shape + (3,)), bend)
    own = axis_angle(rng.normal(size=(2, 21, 3)), rng.uniform(0, np.pi, (2, 21)))
    out = np.broadcast_to(np.eye(4), (steps, 2, 21, 4, 4)).copy()
    out[..., :3, :3] = wrist_r[:, :, None] @ curl @ own
    out[..., :3, 3] = wrist_t[:, :, None] + np.einsum("thij,hkj->thki", wrist_r, offset)
    return out


def test_compressed_poses_fit_the_budget_and_keep_the_actions():
    rng = np.random.default_rng(8)
    chunks = [hand_motion(rng) for _ in range(6)]
    # A half turn exactly, where rotation vectors and quaternions are at their edge.
    chunks[0][-1, 1, 5, :3, :3] = axis_angle([0, 1, 0], np.pi) @ chunks[0][0, 1, 5, :3, :3]
    for poses in chunks:
        # Through the records' msgpack encoding, which must keep dtypes and shapes.
        packed = records.decode(records.encode(actions.compress_poses(poses)))
        assert sum(v.nbytes for v in packed.values()) < 40_000
        decoded = actions.decompress_poses(packed)
        np.testing.assert_allclose(decoded[0], poses[0], atol=1e-6)
        for delta in actions.DELTAS:
            exact, _ = actions.action_chunk(poses, all_valid(65), delta)
            approx, _ = actions.action_chunk(decoded, all_valid(65), delta)
            assert np.linalg.norm(approx[..., :3] - exact[..., :3], axis=-1).max() < 1e-3
            assert np.degrees(rotation_error(approx[..., 3:], exact[..., 3:])).max() < 0.1
            # The pipeline's path, from the stored offsets, gives the same actions, also truncated.
            direct, _ = actions.compressed_action_chunk(packed, all_valid(65), 64, delta)
            np.testing.assert_allclose(direct, approx, atol=2e-6)
            short, _ = actions.compressed_action_chunk(packed, all_valid(65), 8, delta)
            np.testing.assert_array_equal(short, direct[:8])


def test_rotation_error_metric_sees_a_known_angle():
    # Guards the metric above: a 0.1 degree turn must read as 0.1 degree.
    six = np.stack([six_d(np.eye(3)), six_d(rot_z(0.1))])
    np.testing.assert_allclose(np.degrees(rotation_error(six[:1], six[1:])), [0.1], rtol=1e-6)
