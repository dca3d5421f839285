"""From world-frame hand poses to action chunks, the targets that CAIP pairs with images.

For one episode (see caip_jax.data.schema):

    hand_valid, dropped = sanitize(hand_valid, hands)
    ep = resample(hands, hand_valid, camera, fps)                     # 30 Hz
    for a in anchor_indices(len(ep.hands), T):
        poses = to_camera_frame(ep.hands[a:a + T + 1], ep.camera[a])   # [T+1, 2, 21, 4, 4]
        action, mask = action_chunk(poses, ep.hand_valid[a:a + T + 1])

An action chunk is expressed in the camera frame at its anchor, so the head's motion after the
anchor cancels out and only the hands' motion remains. Per step, hand and keypoint it holds 9
numbers: the translation delta (metres) and the rotation delta as its first two columns (the 6D
representation of Zhou et al., 2019), against the anchor (delta="anchor") or the previous step
(delta="step").

Quaternions are (w, x, y, z), unit norm, w >= 0 where this module produces them.
"""
from typing import NamedTuple

import numpy as np

DELTAS = ("anchor", "step")
# Sample times closer than this (in source frames) to a source frame use that frame as it is:
# m * fps / target_fps is not exact in floating point.
_SNAP = 1e-6
_INT16_MAX = 32767


# --- rotations --------------------------------------------------------------------------------


def matrix_to_quat(rot: np.ndarray) -> np.ndarray:
    """Rotation [..., 3, 3] -> unit quaternion [..., 4], w >= 0."""
    r = np.moveaxis(np.asarray(rot, np.float64), (-2, -1), (0, 1))
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = r
    # Row i is 4 q_i q. Shepperd (1978): taking the row with the largest q_i^2 never divides by a
    # small number, so every angle (180 degrees included) keeps full precision.
    rows = np.stack(
        [
            np.stack([1 + r00 + r11 + r22, r21 - r12, r02 - r20, r10 - r01], -1),
            np.stack([r21 - r12, 1 + r00 - r11 - r22, r01 + r10, r02 + r20], -1),
            np.stack([r02 - r20, r01 + r10, 1 - r00 + r11 - r22, r12 + r21], -1),
            np.stack([r10 - r01, r02 + r20, r12 + r21, 1 - r00 - r11 + r22], -1),
        ],
        -2,
    )
    best = np.argmax(np.diagonal(rows, axis1=-2, axis2=-1), -1)
    q = np.take_along_axis(rows, best[..., None, None], -2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def _real(xp):
    """The float dtype of the math: float64 in numpy; float32 in jax.numpy (on accelerators)."""
    return np.float64 if xp is np else xp.float32


def quat_to_matrix(quat: np.ndarray, xp=np) -> np.ndarray:
    """Quaternion [..., 4] (any non-zero norm) -> rotation [..., 3, 3]. `xp`: numpy or jax.numpy."""
    q = xp.asarray(quat, _real(xp))
    w, x, y, z = xp.moveaxis(q / xp.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return xp.stack(
        [
            xp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            xp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            xp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def slerp(q0: np.ndarray, q1: np.ndarray, t) -> np.ndarray:
    """Unit quaternions [..., 4], [..., 4] and fraction t (broadcasts against [...]) -> [..., 4],
    along the shorter arc: q and -q are the same rotation, so q1 is flipped to face q0."""
    dot = np.sum(q0 * q1, -1)
    q1 = np.where(dot[..., None] < 0, -q1, q1)
    theta = np.arccos(np.clip(np.abs(dot), 0.0, 1.0))
    sin = np.sin(theta)
    # As theta -> 0 the slerp weights tend to the linear ones, which need no division.
    near = sin < 1e-9
    safe = np.where(near, 1.0, sin)
    t = np.asarray(t, np.float64)
    w0 = np.where(near, 1 - t, np.sin((1 - t) * theta) / safe)
    w1 = np.where(near, t, np.sin(t * theta) / safe)
    q = w0[..., None] * q0 + w1[..., None] * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quat_to_rotvec(quat: np.ndarray) -> np.ndarray:
    """Quaternion [..., 4] -> rotation vector [..., 3] (axis times angle, angle in [0, pi])."""
    q = np.asarray(quat, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    q = np.where(q[..., :1] < 0, -q, q)
    angle = 2 * np.arctan2(np.linalg.norm(q[..., 1:], axis=-1), q[..., 0])
    # |v| = sin(angle / 2); angle / sin(angle / 2) written with sinc, which is exact at angle 0.
    return q[..., 1:] * (2 / np.sinc(angle / (2 * np.pi)))[..., None]


def rotvec_to_quat(rotvec: np.ndarray, xp=np) -> np.ndarray:
    """Rotation vector [..., 3] -> unit quaternion [..., 4]. `xp`: numpy or jax.numpy."""
    r = xp.asarray(rotvec, _real(xp))
    angle = xp.linalg.norm(r, axis=-1)
    # sin(angle / 2) / angle = sinc(angle / 2pi) / 2, defined at angle 0.
    half_sinc = xp.sinc(angle / (2 * np.pi)) / 2
    return xp.concatenate([xp.cos(angle / 2)[..., None], r * half_sinc[..., None]], -1)


# --- SE(3) ------------------------------------------------------------------------------------


def compose(rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Rotation [..., 3, 3] and translation [..., 3] -> SE(3) [..., 4, 4]."""
    out = np.zeros(rot.shape[:-2] + (4, 4), np.result_type(rot, trans))
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1
    return out


def se3_inverse(pose: np.ndarray) -> np.ndarray:
    """SE(3) [..., 4, 4] -> its inverse in closed form (R^T, -R^T t): exact up to rounding where a
    general matrix inverse would amplify any error in the rotation block."""
    rot_t = np.swapaxes(pose[..., :3, :3], -1, -2)
    return compose(rot_t, -np.einsum("...ij,...j->...i", rot_t, pose[..., :3, 3]))


def to_camera_frame(hands: np.ndarray, camera_anchor: np.ndarray) -> np.ndarray:
    """World-from-keypoint hands [K, 2, 21, 4, 4], world-from-camera camera_anchor [4, 4] ->
    camera-from-keypoint [K, 2, 21, 4, 4]: inv(camera_anchor) @ hands."""
    return se3_inverse(camera_anchor) @ hands


# --- validity ---------------------------------------------------------------------------------


def rigid_mask(pose: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """[..., 4, 4] -> bool [...]: finite, rotation block with R R^T = I and det R = +1, last row
    [0, 0, 0, 1], all within atol."""
    pose = np.asarray(pose, np.float64)
    finite = np.isfinite(pose).all((-2, -1))
    pose = np.where(finite[..., None, None], pose, np.eye(4))  # keeps NaN and inf out of det
    rot = pose[..., :3, :3]
    orthonormal = np.abs(rot @ np.swapaxes(rot, -1, -2) - np.eye(3)).max((-2, -1)) <= atol
    proper = np.abs(np.linalg.det(rot) - 1) <= atol
    last_row = np.abs(pose[..., 3, :] - [0, 0, 0, 1]).max(-1) <= atol
    return finite & orthonormal & proper & last_row


def sanitize(hand_valid: np.ndarray, hands: np.ndarray) -> tuple[np.ndarray, int]:
    """hand_valid [N, 2], hands [N, 2, 21, 4, 4] -> (hand_valid with every hand-frame that has a
    non-rigid or non-finite keypoint marked invalid, how many valid hand-frames that dropped)."""
    rigid = rigid_mask(hands).all(-1)
    return hand_valid & rigid, int(np.sum(hand_valid & ~rigid))


def fill_invalid(hands: np.ndarray, hand_valid: np.ndarray) -> np.ndarray:
    """hands [N, 2, 21, 4, 4] with the poses of invalid hand-frames (hand_valid [N, 2]) replaced by
    the identity, so NaN or garbage never enters the arithmetic and masked outputs stay zero."""
    keep = np.asarray(hand_valid, bool)[..., None, None, None]
    return np.where(keep, hands, np.eye(4, dtype=hands.dtype))


# --- resampling -------------------------------------------------------------------------------


class Resampled(NamedTuple):
    """An episode at the target rate: hands [M, 2, 21, 4, 4], hand_valid [M, 2], camera [M, 4, 4],
    source_index [M] the nearest source frame of each step (whose image goes with it)."""

    hands: np.ndarray
    hand_valid: np.ndarray
    camera: np.ndarray
    source_index: np.ndarray


def _interpolate(poses: np.ndarray, lo: np.ndarray, hi: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """SE(3) [N, ..., 4, 4] at fractional frames lo + frac (towards hi), all [M] -> [M, ..., 4, 4]:
    translation linear, rotation slerp; frac == 0 copies frame lo as it is."""
    a, b = poses[lo].astype(np.float64), poses[hi].astype(np.float64)
    w = frac.reshape((-1,) + (1,) * (a.ndim - 3))
    trans = a[..., :3, 3] + w[..., None] * (b[..., :3, 3] - a[..., :3, 3])
    rot = quat_to_matrix(slerp(matrix_to_quat(a[..., :3, :3]), matrix_to_quat(b[..., :3, :3]), w))
    on_frame = (frac == 0).reshape((-1,) + (1,) * (a.ndim - 1))
    return np.where(on_frame, poses[lo], compose(rot, trans)).astype(poses.dtype)


def resample(hands, hand_valid, camera, fps: float, target_fps: float = 30.0) -> Resampled:
    """hands [N, 2, 21, 4, 4], hand_valid [N, 2], camera [N, 4, 4] at `fps` -> Resampled at times
    m / target_fps <= (N - 1) / fps, each interpolated between its two neighbouring source frames
    and valid where both are; invalid hand-frames come out as the identity (sanitize first, so
    that hand_valid covers NaN poses). The same rate returns the inputs themselves."""
    n = len(hands)
    if fps == target_fps:
        return Resampled(hands, hand_valid, camera, np.arange(n))
    step = fps / target_fps  # source frames per output step
    pos = np.arange(int(np.floor((n - 1 + _SNAP) / step)) + 1) * step
    nearest = np.rint(pos)
    on_frame = np.abs(pos - nearest) <= _SNAP
    lo = np.where(on_frame, nearest, np.floor(pos)).astype(int)
    hi = np.where(on_frame, lo, np.minimum(lo + 1, n - 1))
    frac = np.where(on_frame, 0.0, pos - lo)
    # A tie picks the earlier frame, so the image never shows the future of its pose.
    source_index = np.clip(np.ceil(pos - 0.5), 0, n - 1).astype(int)
    return Resampled(
        hands=_interpolate(fill_invalid(hands, hand_valid), lo, hi, frac),
        hand_valid=hand_valid[lo] & hand_valid[hi],
        camera=_interpolate(camera, lo, hi, frac),
        source_index=source_index,
    )


# --- action chunks ----------------------------------------------------------------------------


def anchor_indices(num_steps: int, horizon: int, stride: int = 1) -> np.ndarray:
    """Every stride-th anchor a with a full future, a + horizon < num_steps -> int [A]."""
    return np.arange(0, max(num_steps - horizon, 0), stride)


def action_chunk(
    poses: np.ndarray, valid: np.ndarray, delta: str = "anchor"
) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame poses [T+1, 2, 21, 4, 4] and valid [T+1, 2] -> (action [T, 2, 21, 9] float32,
    mask [T, 2] bool). Step k = 1..T against reference r = 0 (delta="anchor") or r = k - 1
    (delta="step"): translation p_k - p_r, then columns 0 and 1 of R_k R_r^T; valid where both
    k and r are; masked entries are 0."""
    valid = np.asarray(valid, bool)
    poses = fill_invalid(np.asarray(poses, np.float64), valid)
    return _chunk(poses[..., :3, :3], poses[..., :3, 3], valid, delta)


def _chunk(rot, trans, valid, delta, xp=np):
    """`action_chunk` on rotations [T+1, 2, 21, 3, 3] and translations [T+1, 2, 21, 3]."""
    if delta not in DELTAS:
        raise ValueError(f"delta={delta!r}: expected one of {DELTAS}")
    ref = slice(0, 1) if delta == "anchor" else slice(0, -1)
    rel = rot[1:] @ xp.swapaxes(rot[ref], -1, -2)
    action = xp.concatenate([trans[1:] - trans[ref], rel[..., :, 0], rel[..., :, 1]], -1)
    mask = valid[ref] & valid[1:]
    return xp.where(mask[..., None, None], action, 0).astype(np.float32), mask


def _safe_std(std: np.ndarray, xp=np) -> np.ndarray:
    # A dimension constant over the data (e.g. the rotation of a source that only ever translates)
    # has std 0; dividing by 1 leaves it centred instead of turning it into inf or NaN.
    return xp.where(std == 0, 1.0, std)


def normalize(action, mask, mean, std, xp=np) -> np.ndarray:
    """action [..., T, 2, 21, 9], mask [..., T, 2], mean and std [2, 21, 9] (or broadcasting
    against action) -> (action - mean) / std float32, masked entries 0."""
    out = (xp.asarray(action, _real(xp)) - mean) / _safe_std(std, xp)
    return xp.where(xp.asarray(mask, bool)[..., None, None], out, 0).astype(np.float32)


def denormalize(action, mask, mean, std) -> np.ndarray:
    """The inverse of `normalize` on unmasked entries; masked entries 0."""
    out = np.asarray(action, np.float64) * _safe_std(std) + mean
    return np.where(np.asarray(mask, bool)[..., None, None], out, 0).astype(np.float32)


# --- compact storage --------------------------------------------------------------------------


def compress_poses(poses: np.ndarray) -> dict[str, np.ndarray]:
    """Finite poses [T+1, 2, 21, 4, 4] (fill invalid hand-frames first) -> dict of arrays:

        anchor_translation  float32 [2, 21, 3]     step 0, as it is
        anchor_quaternion   float32 [2, 21, 4]     step 0, as it is
        translation         int16   [T, 2, 21, 3]  p_k - p_0, in units of translation_scale / 32767
        translation_scale   float32 [1]            max |p_k - p_0| over the chunk
        rotation            int16   [T, 2, 21, 3]  rotation vector of R_k R_0^T, units of pi / 32767

    12 bytes per pose after step 0. Both deltas are relative to step 0, so the actions computed
    from the decoded poses do not depend on step 0's own rounding; int16 over the chunk's range
    (rather than float16) has a uniform error: at most scale / 65534 per translation axis and
    about 0.005 degrees per rotation.
    """
    poses = np.asarray(poses, np.float64)
    rot, trans = poses[..., :3, :3], poses[..., :3, 3]
    offset = trans[1:] - trans[0]
    # Quantise against the float32 value that is stored, so that decoding uses the same scale.
    scale = np.maximum(np.float32(np.abs(offset).max(initial=0.0)), np.float32(1e-9))
    rotvec = quat_to_rotvec(matrix_to_quat(rot[1:] @ np.swapaxes(rot[:1], -1, -2)))
    return {
        "anchor_translation": trans[0].astype(np.float32),
        "anchor_quaternion": matrix_to_quat(rot[0]).astype(np.float32),
        "translation": _quantize(offset / np.float64(scale)),
        "translation_scale": np.array([scale], np.float32),
        "rotation": _quantize(rotvec / np.pi),
    }


def _quantize(x: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> int16 in [-32767, 32767]."""
    return np.clip(np.rint(x * _INT16_MAX), -_INT16_MAX, _INT16_MAX).astype(np.int16)


def _offsets(packed: dict[str, np.ndarray], steps: int | None, xp=np) -> tuple[np.ndarray, np.ndarray]:
    """p_k - p_0 [T', 2, 21, 3] and R_k R_0^T [T', 2, 21, 3, 3] for k = 1..T' (T' = `steps`)."""
    scale = xp.asarray(packed["translation_scale"][0], _real(xp)) / _INT16_MAX
    offset = xp.asarray(packed["translation"][:steps], _real(xp)) * scale
    rotvec = xp.asarray(packed["rotation"][:steps], _real(xp)) * (np.pi / _INT16_MAX)
    return offset, quat_to_matrix(rotvec_to_quat(rotvec, xp), xp)


def decompress_poses(packed: dict[str, np.ndarray]) -> np.ndarray:
    """The output of `compress_poses` -> poses [T+1, 2, 21, 4, 4] float32."""
    rot0 = quat_to_matrix(packed["anchor_quaternion"])
    trans0 = np.asarray(packed["anchor_translation"], np.float64)
    offset, rel = _offsets(packed, None)
    rot = np.concatenate([rot0[None], rel @ rot0], 0)
    trans = np.concatenate([trans0[None], trans0 + offset], 0)
    return compose(rot, trans).astype(np.float32)


def compressed_action_chunk(
    packed: dict[str, np.ndarray], valid: np.ndarray, horizon: int, delta: str = "anchor", xp=np
) -> tuple[np.ndarray, np.ndarray]:
    """`action_chunk` of the first `horizon` + 1 poses of `compress_poses`' output (only
    `translation`, `translation_scale` and `rotation` are read), straight from the stored
    offsets: actions only depend on poses relative to a reference step, so step 0's own pose is
    never rebuilt. With xp=jax.numpy this runs inside the jitted training step."""
    offset, rel = _offsets(packed, horizon, xp)
    rot = xp.concatenate([xp.broadcast_to(xp.eye(3, dtype=rel.dtype), (1, *rel.shape[1:])), rel], 0)
    trans = xp.concatenate([xp.zeros_like(offset[:1]), offset], 0)
    return _chunk(rot, trans, xp.asarray(valid[: horizon + 1], bool), delta, xp)
