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
                                            cy = 540 for the 1920x1080 video (Apple's
                                            utils/data_utils.py get_camera_intrinsics)
    attrs                llm_description, llm_description2, which_llm_description ("1" or "2"),
                         llm_type, task, environment, object, ...; older files hold `description`.

Frame i of the mp4 goes with row i of every dataset (paper 3.2; Apple's simple_dataset.py reads
VideoDecoder(mp4)[i] beside transforms/<joint>[i]).

Defects of the published files (github.com/apple/ml-egodex issues), and what this reader does:

- camera/intrinsic of shape (0, 3), empty (issue 10: part1), or absent (issue 3: downloads before
  about August 2025 lacked the values). Apple's loader reads the empty array without complaint (it uses
  the intrinsics for nothing) and fails on an absent one; Apple's utils/data_utils.py gives the
  constant "if not getting it from the data. it is always the same". Here: that constant,
  with a warning, for any intrinsics that are not a finite 3x3 with positive focal lengths. The
  poses, and so the action chunks, do not depend on it.
- which_llm_description absent (issues 3 and 8: downloads from before about August
  2025). Apple's loader fails
  on a reversible task without it (KeyError); a reversible task's two descriptions name opposite
  directions, so guessing one would mislabel about half of them. Here: the direction-neutral
  task name ("charge uncharge airpods"), with a warning; other tasks are unaffected.
- Video frames and pose rows of different counts (no issue; Apple's loader indexes the episode by
  len(transforms/leftHand) and serves frame i with pose i, so it serves exactly the frames that
  both have). Here: the first min(frames, rows) of each, with a warning giving both counts; an
  episode with nothing to pair is an EpisodeError.

Warnings name the episode; the converters list them per episode in summary.json.

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
`description`, then to the task name, which is also the text of a reversible task whose file
lacks `which_llm_description` (see the defects above).
"""
import logging
import os

import h5py
import numpy as np

from caip_jax.data import video
from caip_jax.data.schema import HANDS, NUM_KEYPOINTS, Episode, EpisodeError

FPS = 30.0  # paper 3.2: video and poses at 30 Hz; the files carry no rate of their own
MIN_CONFIDENCE = 0.5  # midway in ARKit's [0, 1]: keep frames where the tracker saw more than it guessed
# Apple's utils/data_utils.py get_camera_intrinsics: the 1920x1080 video's, the same in every file.
INTRINSICS = np.array([[736.6339, 0.0, 960.0], [0.0, 736.6339, 540.0], [0.0, 0.0, 1.0]])

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
    or a video and poses with no frame in common."""
    path = os.path.join(input_path, key + ".hdf5")
    mp4 = os.path.join(input_path, key + ".mp4")
    if not os.path.exists(mp4):
        raise EpisodeError(f"{key}: missing video {mp4}")
    task = os.path.basename(os.path.dirname(path))
    try:
        with h5py.File(path, "r") as f:
            arrays = _arrays(f, key)
            intrinsics = _intrinsics(f, key)
            text = _text(f.attrs, task, key)
    except OSError as error:
        raise EpisodeError(f"{key}: cannot read {path}: {error}") from error
    n = _paired_length(key, video.count_frames(mp4), arrays)
    hands, hand_valid = zip(*(_hand(arrays, JOINTS[side], n, min_confidence) for side in HANDS))
    return Episode(
        source="egodex",
        episode_id=key,
        text=text,
        fps=FPS,
        hands=np.stack(hands, axis=1),
        hand_valid=np.stack(hand_valid, axis=1),
        camera=arrays["transforms/camera"][:n],
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


def _arrays(f: h5py.File, key: str) -> dict[str, np.ndarray]:
    """transforms/camera [N, 4, 4], and for each hand that has all 21 transforms, those [N, 4, 4]
    and the confidences [N] the file has (a hand lacking some is left out, with a warning: it is
    invalid throughout). Lengths as in the file."""
    out = {"transforms/camera": _dataset(f, "transforms/camera", (None, 4, 4), key)}
    for side in HANDS:
        missing = [name for name in JOINTS[side] if f"transforms/{name}" not in f]
        if missing:
            logger.warning("%s: %s lacks transforms for %s: that hand is invalid throughout", key, f.filename,
                           missing)
            continue
        for name in JOINTS[side]:
            out[f"transforms/{name}"] = _dataset(f, f"transforms/{name}", (None, 4, 4), key)
            if f"confidences/{name}" in f:
                out[f"confidences/{name}"] = _dataset(f, f"confidences/{name}", (None,), key)
    return out


def _paired_length(key: str, frames: int, arrays: dict[str, np.ndarray]) -> int:
    """The frames the video and every dataset have: frame i goes with row i of each (see the
    module docstring), with a warning where their lengths differ."""
    rows = len(arrays["transforms/camera"])
    n = min(frames, *map(len, arrays.values()))
    if not n:
        raise EpisodeError(f"{key}: the mp4 has {frames} frames and the hdf5 {rows} poses: no frame to pair")
    other = [f"{name} {len(array)}" for name, array in arrays.items() if len(array) != rows]
    if frames != rows or other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        others = f" (but {', '.join(other[:3])}{more})" if other else ""
        logger.warning("%s: the mp4 has %d frames, the hdf5 %d poses%s: using the first %d of each, frame i "
                       "with pose i", key, frames, rows, others, n)
    return n


def _hand(arrays: dict[str, np.ndarray], names: tuple[str, ...], n: int, min_confidence: float):
    """One hand's [n, 21, 4, 4] world-from-keypoint poses (identity where unknown) and [n] validity."""
    if any(f"transforms/{name}" not in arrays for name in names):
        return np.broadcast_to(np.eye(4), (n, NUM_KEYPOINTS, 4, 4)).copy(), np.zeros(n, bool)
    poses = np.stack([arrays[f"transforms/{name}"][:n] for name in names], axis=1)
    confidence = np.stack([arrays[f"confidences/{name}"][:n] if f"confidences/{name}" in arrays else np.ones(n)
                           for name in names], axis=1)
    finite = np.isfinite(poses).all(axis=(2, 3))  # [n, 21]
    poses[~finite] = np.eye(4)  # no NaN reaches downstream arithmetic, masked or not
    return poses, (finite & (confidence >= min_confidence)).all(axis=1)


def _intrinsics(f: h5py.File, key: str) -> np.ndarray:
    """camera/intrinsic, or `INTRINSICS` (with a warning) where the file's are absent or not a
    finite 3x3 with positive focal lengths (see the module docstring)."""
    name = "camera/intrinsic"
    if name in f:
        value = np.asarray(f[name], np.float64)
        if value.shape == (3, 3) and np.isfinite(value).all() and value[0, 0] > 0 and value[1, 1] > 0:
            return value
        found = f"has shape {value.shape}" if value.shape != (3, 3) else f"holds {value.tolist()}"
    else:
        found = "is missing"
    logger.warning("%s: %s %s: using EgoDex's fixed intrinsics", key, name, found)
    return INTRINSICS.copy()


def _text(attrs: h5py.AttributeManager, task: str, key: str) -> str:
    """The episode's instruction (see the module docstring for the choice)."""
    reversible = _str(attrs.get("llm_type", "")) == "reversible"
    if reversible and "which_llm_description" not in attrs:
        logger.warning("%s: a reversible task without which_llm_description (an EgoDex download from before "
                       "August 2025): its direction is unknown, so the text is the task name", key)
        return task.replace("_", " ")
    reverse = reversible and _str(attrs["which_llm_description"]) == "2"
    for name in ("llm_description2" if reverse else "llm_description", "llm_description", "description"):
        if name in attrs:
            return _str(attrs[name]).strip()
    return task.replace("_", " ")


def _str(value) -> str:
    """An HDF5 attribute (str, bytes, or a one-element array of them) as str."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
