"""Apple's EgoDex (Hoque et al. 2025, arXiv 2505.11709): egocentric Apple Vision Pro video with
ARKit hand, body and head tracking, 30 Hz.

Layout (paper A.2-A.3; README of github.com/apple/ml-egodex, whose schema public loaders quote):

    <input_path>/part1 .. part5 | test | extra/<task>/<i>.hdf5   with <i>.mp4 beside it

    transforms/<joint>   [N, 4, 4] float32  world-from-joint SE(3), metres, in the ARKit origin
                                            frame (fixed at the start of recording; y up; not the
                                            same across episodes)
    transforms/camera    [N, 4, 4]          world-from-camera ("camera extrinsics in the world
                                            frame": Apple's utils/data_utils.py takes camera-frame
                                            poses as inv(camera) @ joint)
    confidences/<joint>  [N]                ARKit confidence in [0, 1]; 0 means fully occluded
                                            (paper 3.2). The wrist's says whether the hand is seen
                                            at all, a finger joint's is relative to the wrist (A.3).
                                            Optional: some (older) files lack it.
    camera/intrinsic     [3, 3]             the same in every file: fx = fy = 736.6339, cx = 960,
                                            cy = 540 for the 1920x1080 video
    attrs                llm_description, llm_description2, which_llm_description ("1" or "2"),
                         llm_type, task, environment, object, ...; older files hold `description`.

The mp4 and the transforms share frame i at 30 Hz (paper 3.2); a file whose counts differ is
rejected rather than trimmed, because a shifted pairing would silently mislabel every frame.

Camera axes: EgoDex's camera frame already has OpenCV axes (x right, y down, z forward), so the
camera poses are taken unchanged. Evidence: Apple's visualize_2d.py maps joints into the camera
frame with inv(camera) @ joint and utils/draw_utils.py projects them with
cv2.projectPoints(point, I, 0, intrinsic), i.e. u = fx x / z + cx, v = fy y / z + cy. In ARKit's
own camera axes (y up, z backward) that projection would mirror every overlay left to right,
which is not the "some perspective error" (the video is composited from several cameras) that
Apple's script warns of. ml-egodex issue 12 asks the question outright and has no answer yet: the
first real episode should be checked by projecting its wrists. The world frame (ARKit's, y up)
is kept, since the schema allows any world frame.

Joints: the paper's A.3 list, i.e. ARKit's visionOS HandSkeleton.JointName with a `left` /
`right` prefix, whose order runs wrist, thumbKnuckle, thumbIntermediateBase, thumbIntermediateTip,
thumbTip, indexFingerMetacarpal, indexFingerKnuckle, ... outwards from the wrist. The thumb has
no metacarpal joint, so its knuckle is the CMC; a finger's metacarpal joint (in the palm, by the
wrist) has no MANO / OpenPose slot and is not used.

    slot   ours (schema.py)      EgoDex
    0      wrist                 {side}Hand
    1-4    thumb  CMC MCP IP tip {side}Thumb{Knuckle, IntermediateBase, IntermediateTip, Tip}
    5-8    index  MCP PIP DIP tip {side}IndexFinger{Knuckle, IntermediateBase, IntermediateTip, Tip}
    9-12   middle                {side}MiddleFinger{...same four}
    13-16  ring                  {side}RingFinger{...}
    17-20  little                {side}LittleFinger{...}

A hand is valid at a frame when all 21 of its joints have confidence >= `min_confidence` and
finite transforms. A hand without some of its joint datasets is invalid throughout (logged as a
warning naming the episode); joints without confidences count as confident.

Text: for `llm_type == "reversible"` tasks (a task and its inverse sharing one folder, e.g.
charge_uncharge_airpods) `which_llm_description` says which direction this episode did, and it is
`llm_description` for "1", `llm_description2` for "2" (the rule of Apple's simple_dataset.py, as
public copies quote it); other tasks use `llm_description`; older files fall back to
`description`, then to the task name.
"""
import logging
import os

import h5py
import numpy as np

from caip_jax.data import video
from caip_jax.data.schema import HANDS, NUM_KEYPOINTS, Episode, EpisodeError

FPS = 30.0  # paper 3.2: video and poses at 30 Hz; the files carry no rate of their own
MIN_CONFIDENCE = 0.5  # midway in ARKit's [0, 1]: keep frames where the tracker saw more than it guessed

_FINGERS = ("Thumb", "IndexFinger", "MiddleFinger", "RingFinger", "LittleFinger")
_FINGER_JOINTS = ("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")
# EgoDex joint names in our 21-keypoint order, per hand ("left", "right").
JOINTS = {
    side: (f"{side}Hand",) + tuple(f"{side}{finger}{part}" for finger in _FINGERS for part in _FINGER_JOINTS)
    for side in HANDS
}

logger = logging.getLogger(__name__)


def list_episodes(input_path: str, **options) -> list[str]:
    """Keys: every .hdf5 below `input_path`, relative and without the extension
    ("part1/basic_pick_place/0"). One without its mp4 is listed too, so that read_episode reports
    it ("missing video") instead of it vanishing from the counts."""
    keys = []
    for directory, _, files in os.walk(input_path):
        for name in files:
            if name.endswith(".hdf5"):
                keys.append(os.path.relpath(os.path.join(directory, name[: -len(".hdf5")]), input_path))
    return sorted(keys)


def read_episode(input_path: str, key: str, min_confidence: float = MIN_CONFIDENCE, **options) -> Episode:
    """The episode `key`; raises EpisodeError for a missing video, a file without camera poses,
    or pose and frame counts that differ."""
    path = os.path.join(input_path, key + ".hdf5")
    mp4 = os.path.join(input_path, key + ".mp4")
    if not os.path.exists(mp4):
        raise EpisodeError(f"{key}: missing video {mp4}")
    task = os.path.basename(os.path.dirname(path))
    try:
        with h5py.File(path, "r") as f:
            camera = _dataset(f, "transforms/camera", (None, 4, 4), key)
            n = len(camera)
            hands, hand_valid = zip(*(_hand(f, JOINTS[side], n, min_confidence, key) for side in HANDS))
            intrinsics = _dataset(f, "camera/intrinsic", (3, 3), key) if "camera/intrinsic" in f else None
            text = _text(f.attrs, task)
    except OSError as error:
        raise EpisodeError(f"{key}: cannot read {path}: {error}") from error
    num_frames = video.count_frames(mp4)
    if num_frames != n:
        raise EpisodeError(f"{key}: {mp4} has {num_frames} frames but {path} has {n} poses")
    return Episode(
        source="egodex",
        episode_id=key,
        text=text,
        fps=FPS,
        hands=np.stack(hands, axis=1),
        hand_valid=np.stack(hand_valid, axis=1),
        camera=camera,
        frames=video.VideoFrames(mp4, 0, n),
        intrinsics=intrinsics,
        labels={"task": task},
    )


def _dataset(f: h5py.File, name: str, shape: tuple, key: str) -> np.ndarray:
    """Dataset `name` as float64, checked against `shape` (None matches any length)."""
    if name not in f:
        raise EpisodeError(f"{key}: {f.filename} has no {name}")
    array = np.asarray(f[name], np.float64)
    if array.ndim != len(shape) or any(want not in (None, got) for got, want in zip(array.shape, shape)):
        raise EpisodeError(f"{key}: {f.filename}: {name} has shape {array.shape}, expected {shape}")
    return array


def _hand(f: h5py.File, names: tuple[str, ...], n: int, min_confidence: float, key: str):
    """One hand's [n, 21, 4, 4] world-from-keypoint poses (identity where unknown) and [n] validity."""
    missing = [name for name in names if f"transforms/{name}" not in f]
    if missing:
        logger.warning("%s: %s lacks transforms for %s: that hand is invalid throughout", key, f.filename,
                       missing)
        return np.broadcast_to(np.eye(4), (n, NUM_KEYPOINTS, 4, 4)).copy(), np.zeros(n, bool)
    poses = np.stack([_dataset(f, f"transforms/{name}", (n, 4, 4), key) for name in names], axis=1)
    confidence = np.stack(
        [_dataset(f, f"confidences/{name}", (n,), key) if f"confidences/{name}" in f else np.ones(n)
         for name in names],
        axis=1,
    )
    finite = np.isfinite(poses).all(axis=(2, 3))  # [n, 21]
    poses[~finite] = np.eye(4)  # no NaN reaches downstream arithmetic, masked or not
    return poses, (finite & (confidence >= min_confidence)).all(axis=1)


def _text(attrs: h5py.AttributeManager, task: str) -> str:
    """The episode's instruction (see the module docstring for the choice)."""
    reversible = _str(attrs.get("llm_type", "")) == "reversible"
    reverse = reversible and _str(attrs.get("which_llm_description", "1")) == "2"
    for name in ("llm_description2" if reverse else "llm_description", "llm_description", "description"):
        if name in attrs:
            return _str(attrs[name]).strip()
    return task.replace("_", " ")


def _str(value) -> str:
    """An HDF5 attribute (str, bytes, or a one-element array of them) as str."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
