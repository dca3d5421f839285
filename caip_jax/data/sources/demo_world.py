"""The demo world: a procedural tabletop where one hand acts on one object as the instruction says.

This is the data of the README's demo and of many tests. A tiny CAIP must learn it on a CPU in
minutes, so the future hand motion is a function of what the image and the text show: which hand
(named in the text), where the target object lies (found in the image by its colour and shape,
named in the text) and the verb.

World conventions (metres, seconds):
    world frame: the table top is the plane z = 0, z up; x to the viewer's right, y away from
        the viewer. The head camera sits about 0.6 m from the table centre, in front of it and
        above, looking down at it.
    camera [N, 4, 4]: world from camera, OpenCV axes (x right, y down, z forward); it sways a
        little (about a centimetre and a degree) over the episode.
    intrinsics [3, 3]: pinhole, pixel centres at integer coordinates (pixel (row i, col j) is at
        u = j, v = i), the principal point at the image centre.
    hands [N, 2, 21, 4, 4]: world from keypoint, keypoints in schema.py's order. A keypoint's
        frame: x along the bone leaving it (a tip: along its last bone), z out of the back of the
        hand, y completing a right-handed frame; the wrist's frame is the hand's frame.
    objects: cubes, balls and cylinders standing on the table; an object's "centre" is the centre
        of its body (z = half its height).
    time: an episode always shows the whole action, so plans use normalised time t in [0, 1]
        over the episode whatever its frame count; `fps` only labels the frames.

The named hand lifts off its rest pose, arcs to the target and acts: "pick up" opens above it,
lowers, closes and lifts it 9 cm; "push" makes a loose fist and slides it 10 cm onwards (away
from the hand's rest); "touch" points the index finger, sets its tip on the top and lifts a
little. The other hand rests, fidgeting by a centimetre or so; in MISSING_PROBABILITY of the
episodes it pulls back out of view for a while (hand_valid False, not drawn). There are no
collisions: only the target moves, and a hand may pass through another object on its way.

Keys name episodes ("demo_s0_000017": seed 0, index 17); everything in an episode comes from the
`EpisodeSpec` that `episode_spec(seed, index)` draws, so frames, poses and masks always agree.
"""
import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from caip_jax.data.schema import HANDS, ArrayFrames, Episode, EpisodeError

SOURCE = "demo_world"
COLOURS = {"red": (200, 40, 35), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40)}
SHAPES = ("cube", "ball", "cylinder")
VERBS = ("pick up", "push", "touch")
MASK_BACKGROUND, MASK_HAND, MASK_TARGET, MASK_OTHER = 0, 1, 2, 3
MISSING_PROBABILITY = 0.15  # episodes where the idle hand leaves the view for a while

_KEY = re.compile(r"demo_s(\d+)_(\d+)")
_LIGHT = np.array([-0.3, -0.25, 1.0]) / np.linalg.norm([-0.3, -0.25, 1.0])  # towards the light
_EYE, _LOOK_AT = np.array([0.0, -0.32, 0.52]), np.array([0.0, -0.03, 0.0])  # head camera at rest
_FOCAL = 1.0  # focal length in image widths: a 53 degree field of view

# --- the hand skeleton: a right hand in its wrist frame (x to the fingers, y to the thumb, z out
# of the back of the hand), metres. A left hand is its mirror image in y.
_FINGER_BASE = np.array([  # thumb CMC, index/middle/ring/little MCP
    [0.028, 0.022, -0.012], [0.088, 0.024, 0.0], [0.092, 0.004, 0.0], [0.087, -0.015, 0.0],
    [0.078, -0.032, 0.0],
])
_FINGER_YAW = np.radians([35.0, 6.0, 0.0, -6.0, -14.0])  # splay about z
_FINGER_ROLL = np.radians([-80.0, 0.0, 0.0, 0.0, 0.0])  # the thumb curls across the palm
_BONES = np.array([  # lengths of the three bones of each finger
    [0.040, 0.032, 0.026], [0.042, 0.025, 0.021], [0.046, 0.029, 0.022], [0.043, 0.027, 0.022],
    [0.034, 0.020, 0.019],
])
_CURL_RELAXED = np.radians([10.0, 10.0, 5.0])  # flexion of each joint at curl 0, plus curl x _CURL_FULL
_CURL_FULL = np.radians([[35, 35, 35]] + [[80, 95, 60]] * 4)  # thumb, then the four fingers
_PALM_CENTRE = np.array([0.055, 0.0, 0.0])  # the point the plans move, in the wrist frame
_PALM_POLYGON = (0, 1, 5, 9, 13, 17)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object on the table: `xy` [2] its centre's table position (m), `size` its width and
    height (m), `yaw` its rotation about z (rad)."""

    colour: str
    shape: str
    xy: np.ndarray
    size: float
    yaw: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """Everything random about one episode; trajectories and pictures are functions of it.

    rest [2, 3]: each hand's resting palm centre (world); start, reach: when the named hand sets
    off and how long it takes to get to the object (normalised time); missing: None or
    (t0, t1), when the idle hand is out of view; phases [17, 3]: phases of the smooth jitter
    (5 channels per hand, 7 for the camera); skin [3], table_colours [2, 3]: RGB.
    """

    key: str
    objects: tuple[SceneObject, ...]
    target: int
    hand: int  # 0 left, 1 right
    verb: str
    rest: np.ndarray
    start: float
    reach: float
    missing: tuple[float, float] | None
    phases: np.ndarray
    skin: np.ndarray
    table: str  # "wood" or "checker"
    table_colours: np.ndarray

    @property
    def labels(self) -> dict[str, str]:
        return {"target": self.objects[self.target].name, "hand": HANDS[self.hand], "verb": self.verb}

    @property
    def text(self) -> str:
        return "{verb} the {target} with the {hand} hand".format(**self.labels)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """An episode's 3D state at its frames: camera [N, 4, 4], hands [N, 2, 21, 4, 4],
    hand_valid [N, 2], objects [N, M, 3] object centres (world, metres)."""

    camera: np.ndarray
    hands: np.ndarray
    hand_valid: np.ndarray
    objects: np.ndarray


# ----------------------------------------------------------------------------- the spec


def episode_key(seed: int, index: int) -> str:
    return f"demo_s{seed}_{index:06d}"


def parse_key(key: str) -> tuple[int, int]:
    """"demo_s<seed>_<index>" -> (seed, index); EpisodeError for anything else."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise EpisodeError(f"{key!r} is not a demo world key (demo_s<seed>_<index>)")
    return int(match[1]), int(match[2])


def _place_objects(rng: np.random.Generator, count: int) -> np.ndarray:
    """Table positions [count, 2] at least 9 cm apart, in the area in front of the hands."""
    points = []
    for _ in range(1000):
        p = rng.uniform([-0.15, 0.0], [0.15, 0.17])
        if all(np.linalg.norm(p - q) >= 0.09 for q in points):
            points.append(p)
            if len(points) == count:
                break
    return np.array(points)


def episode_spec(seed: int, index: int) -> EpisodeSpec:
    """Draws episode `index` of `seed`: 3-4 objects of distinct colour-and-shape (so the
    instruction names exactly one), the target, the hand, the verb and the nuisances."""
    rng = np.random.default_rng([seed, index, 0xDE30])
    count = int(rng.integers(3, 5))
    kinds = rng.choice(len(COLOURS) * len(SHAPES), count, replace=False)
    xy = _place_objects(rng, count)
    sizes, yaws = rng.uniform(0.04, 0.055, count), rng.uniform(0, np.pi / 2, count)
    objects = tuple(
        SceneObject(list(COLOURS)[k // len(SHAPES)], SHAPES[k % len(SHAPES)], p, float(size), float(yaw))
        for k, p, size, yaw in zip(kinds, xy, sizes, yaws)
    )
    rest = np.array([[-0.2, -0.17, 0.055], [0.2, -0.17, 0.055]])
    rest[:, :2] += rng.uniform(-0.02, 0.02, (2, 2))
    start, t0 = rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.6)
    missing = (t0, t0 + rng.uniform(0.15, 0.3)) if rng.random() < MISSING_PROBABILITY else None
    table = ("wood", "checker")[int(rng.integers(2))]
    light_dark = [[150, 100, 60], [120, 75, 45]] if table == "wood" else [[200, 200, 190], [110, 115, 120]]
    return EpisodeSpec(
        key=episode_key(seed, index), objects=objects, target=int(rng.integers(len(objects))),
        hand=int(rng.integers(2)), verb=VERBS[int(rng.integers(len(VERBS)))], rest=rest, start=float(start),
        reach=float(rng.uniform(0.3, 0.4)), missing=missing, phases=rng.uniform(0, 2 * np.pi, (17, 3)),
        skin=np.array([225, 175, 140]) * rng.uniform(0.75, 1.05), table=table,
        table_colours=np.clip(np.array(light_dark) * rng.uniform(0.85, 1.15, (1, 3)), 0, 255),
    )


# ----------------------------------------------------------------------------- rotations


def _rotation(axis: int, angle: np.ndarray) -> np.ndarray:
    """Rotations about x (0), y (1) or z (2) by `angle` [...] -> [..., 3, 3]."""
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros(angle.shape + (3, 3))
    i, j = (axis + 1) % 3, (axis + 2) % 3  # cyclic, so that every rotation is counter-clockwise
    out[..., axis, axis] = 1
    out[..., i, i], out[..., i, j], out[..., j, i], out[..., j, j] = c, -s, s, c
    return out


def _pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """[..., 3, 3], [..., 3] -> [..., 4, 4] rigid transforms."""
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3], out[..., :3, 3], out[..., 3, 3] = rotation, translation, 1
    return out


def _look_at(eye: np.ndarray, target: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """World-from-camera [N, 4, 4] (OpenCV axes) for eyes [N, 3] looking at targets [N, 3],
    world +y showing as image up, then rolled by `roll` [N] about the optical axis."""
    z = (target - eye) / np.linalg.norm(target - eye, axis=-1, keepdims=True)
    x = np.cross(np.array([0.0, -1.0, 0.0]), z)  # image down is world -y, so x = down x forward
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    rotation = np.stack([x, np.cross(z, x), z], axis=-1) @ _rotation(2, roll)
    return _pose(rotation, eye)


# ----------------------------------------------------------------------------- trajectories


def _wobble(phases: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Smooth jitter in [-1, 1]: phases [D, 3], t [N] -> [N, D], three sinusoids per channel."""
    frequencies, weights = np.array([1.3, 2.9, 4.7]), np.array([1.0, 0.5, 0.25]) / 1.75
    return np.sin(2 * np.pi * frequencies * t[:, None, None] + phases) @ weights


def _min_jerk(times: np.ndarray, values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Minimum-jerk moves between keyframes: times [K] increasing, values [K, D], t [N] -> [N, D].
    Human reaching follows this bell-shaped speed profile."""
    i = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    s = np.clip((t - times[i]) / (times[i + 1] - times[i]), 0, 1)
    w = s**3 * (10 - 15 * s + 6 * s**2)
    return values[i] + w[:, None] * (values[i + 1] - values[i])


def _keyframe(palm, yaw, pitch, curl) -> np.ndarray:
    """One keyframe of a hand: palm centre [3], yaw, pitch, curl [5] -> [10]."""
    return np.concatenate([palm, [yaw, pitch], np.broadcast_to(curl, (5,))])


def _rest_keyframe(spec: EpisodeSpec, hand: int) -> np.ndarray:
    """Palm down, fingers forward and turned a little inwards, fingertips on the table."""
    return _keyframe(spec.rest[hand], (-0.25, 0.25)[hand], 0.0, 0.1)


def _plan(spec: EpisodeSpec) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The named hand's plan: keyframe times [K], keyframes [K, 10] (see `_keyframe`) and the
    time from which the target moves with the palm (None: it never does)."""
    obj = spec.objects[spec.target]
    rest = _rest_keyframe(spec, spec.hand)
    away = obj.xy - rest[:2]
    u = np.append(away / np.linalg.norm(away), 0.0)  # horizontal direction from rest to the object
    yaw = float(np.clip(np.arctan2(-u[0], u[1]), -1.3, 1.3))  # fingers point at the object
    centre, h = np.append(obj.xy, 0.0), obj.size
    t1, contact = spec.start + spec.reach, None
    if spec.verb == "pick up":  # open above it, lower, close the hand, lift
        grip = [0.6, 0.8, 0.8, 0.8, 0.8]
        low = centre + [0, 0, max(h + 0.025, 0.092)]  # closing fingers point down: they reach 9 cm
        keys = [(t1, _keyframe(low + [0, 0, 0.05], yaw, 0.2, 0.0)),
                (t1 + 0.12, _keyframe(low, yaw, 0.2, 0.0)),
                (t1 + 0.2, _keyframe(low, yaw, 0.2, grip)),
                (t1 + 0.35, _keyframe(low + [0, 0, 0.09], yaw, 0.1, grip))]
        contact = t1 + 0.2  # the hand has closed
    elif spec.verb == "push":  # a loose fist, knuckles to its near side, then slide it 10 cm on
        fist = [0.5, 0.85, 0.85, 0.85, 0.85]
        behind = centre - u * (h / 2 + 0.05) + [0, 0, 0.056]  # the knuckles lead the palm by ~5 cm
        keys = [(t1, _keyframe(behind - 0.04 * u, yaw, 0.0, fist)),
                (t1 + 0.1, _keyframe(behind, yaw, 0.0, fist)),
                (t1 + 0.4, _keyframe(behind + 0.1 * u, yaw, 0.0, fist))]
        contact = t1 + 0.1  # the fingertips meet it
    else:  # touch: point the index finger, hover, lower its tip onto the top, lift a little
        point = [0.6, 0.0, 0.9, 0.9, 0.9]
        above = centre - 0.07 * u  # the pointing fingertip reaches about 7 cm beyond the palm
        keys = [(t1, _keyframe(above + [0, 0, h + 0.09], yaw, 0.3, point)),
                (t1 + 0.12, _keyframe(above + [0, 0, h + 0.06], yaw, 0.55, point)),
                (t1 + 0.22, _keyframe(above + [0, 0, h + 0.06], yaw, 0.55, point)),
                (t1 + 0.32, _keyframe(above + [0, 0, h + 0.08], yaw, 0.45, point))]
    times = [0.0, spec.start] + [k[0] for k in keys] + [max(1.0, keys[-1][0] + 1e-3)]
    values = [rest, rest] + [k[1] for k in keys] + [keys[-1][1]]
    return np.array(times), np.stack(values), contact


def _object_centres(spec: EpisodeSpec, t: np.ndarray) -> np.ndarray:
    """Object centres [N, M, 3] at times t [N]: all still, except that a target picked up or
    pushed follows the palm's planned (jitter-free) motion from the contact on."""
    base = np.array([[*o.xy, o.size / 2] for o in spec.objects])
    centres = np.repeat(base[None], len(t), axis=0)
    times, values, contact = _plan(spec)
    if contact is not None:
        palm = _min_jerk(times, values, np.append(t, contact))[:, :3]
        centres[:, spec.target] += np.where(t[:, None] >= contact, palm[:-1] - palm[-1], 0.0)
    return centres


def _finger_frames(curl: np.ndarray, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keypoint frames in the wrist frame for curls [N, 5] in [0, 1]: rotations [N, 21, 3, 3],
    positions [N, 21, 3]. Each joint bends its bone about the bone's y axis, towards the palm."""
    n = len(curl)
    rotations, positions = np.tile(np.eye(3), (n, 21, 1, 1)), np.zeros((n, 21, 3))
    for f in range(5):
        base = _rotation(2, _FINGER_YAW[f]) @ _rotation(0, _FINGER_ROLL[f])
        flexion = np.cumsum(_CURL_RELAXED + curl[:, f, None] * _CURL_FULL[f], axis=1)  # [N, 3]
        position = np.broadcast_to(_FINGER_BASE[f], (n, 3))
        for j in range(4):  # base, two middle joints, tip (the tip keeps its last bone's frame)
            rotation = base @ _rotation(1, flexion[:, min(j, 2)])
            rotations[:, 1 + 4 * f + j], positions[:, 1 + 4 * f + j] = rotation, position
            if j < 3:
                position = position + rotation[:, :, 0] * _BONES[f, j]
    if mirror:  # the mirror image of a right hand, kept as proper rotations: M R M, M = diag(1, -1, 1)
        m = np.array([1.0, -1.0, 1.0])
        rotations, positions = rotations * m[:, None] * m, positions * m
    return rotations, positions


def _hand_poses(track: np.ndarray, mirror: bool) -> np.ndarray:
    """World from keypoint [N, 21, 4, 4] for a hand track [N, 10] (see `_keyframe`)."""
    yaw, pitch = track[:, 3], track[:, 4]
    hand = _rotation(2, np.pi / 2 + yaw) @ _rotation(1, pitch)  # wrist x to world +y at yaw 0
    wrist = track[:, :3] - hand @ _PALM_CENTRE
    rotations, positions = _finger_frames(np.clip(track[:, 5:], 0, 1), mirror)
    return _pose(hand[:, None] @ rotations, wrist[:, None] + np.einsum("nij,nkj->nki", hand, positions))


def _arc(spec: EpisodeSpec, t: np.ndarray) -> np.ndarray:
    """Extra height [N] of the reaching palm: it lifts off the table on the way to the object
    (so that the fingers, changing shape, clear the table) and comes down smoothly."""
    s = np.clip((t - spec.start) / spec.reach, 0, 1)
    return 0.06 * np.sin(np.pi * s) ** 2


def _retreat(spec: EpisodeSpec, t: np.ndarray) -> np.ndarray:
    """How far [N] in [0, 1] the idle hand has pulled back out of view (0 without a gap)."""
    if spec.missing is None:
        return np.zeros_like(t)
    (t0, t1), ramp = spec.missing, 0.08
    times = np.array([0, t0 - ramp, t0, t1, t1 + ramp, 2.0])
    return _min_jerk(times, np.array([0, 0, 1, 1, 0, 0.0])[:, None], t)[:, 0]


def episode_geometry(spec: EpisodeSpec, num_frames: int) -> Geometry:
    """The episode's camera, hands and objects at `num_frames` frames spread over t in [0, 1]."""
    t = np.linspace(0.0, 1.0, num_frames)
    wobble = _wobble(spec.phases, t)  # [N, 17]
    tracks = []
    for hand in range(2):
        if hand == spec.hand:
            track = _min_jerk(*_plan(spec)[:2], t)
            track[:, 2] += _arc(spec, t)
            amplitude = np.array([0.003, 0.003, 0.002, 0.03, 0.05])  # palm xyz (m), yaw (rad), curl
        else:  # the idle hand rests, fidgeting a little
            track = np.tile(_rest_keyframe(spec, hand), (num_frames, 1))
            amplitude = np.array([0.008, 0.008, 0.003, 0.06, 0.05])
        jitter = wobble[:, 5 * hand:5 * hand + 5] * amplitude  # the curl channel moves all fingers
        track[:, :4] += jitter[:, :4]
        track[:, 5:] += jitter[:, 4:]
        tracks.append(track)
    retreat = _retreat(spec, t)
    tracks[1 - spec.hand][:, 1] -= 0.35 * retreat  # back, off the bottom of the image
    hands = np.stack([_hand_poses(tracks[h], mirror=(h == 0)) for h in range(2)], axis=1)
    valid = np.ones((num_frames, 2), bool)
    valid[:, 1 - spec.hand] = retreat < 0.5
    eye = _EYE + 0.01 * wobble[:, 10:13]
    camera = _look_at(eye, _LOOK_AT + 0.01 * wobble[:, 13:16], np.radians(1.0) * wobble[:, 16])
    return Geometry(camera, hands, valid, _object_centres(spec, t))


def intrinsics(image_size: int) -> np.ndarray:
    """Pinhole intrinsics [3, 3] of the head camera at `image_size` pixels square."""
    f, c = _FOCAL * image_size, (image_size - 1) / 2
    return np.array([[f, 0, c], [0, f, c], [0, 0, 1.0]])


# ----------------------------------------------------------------------------- drawing


def _project(points: np.ndarray, camera: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [..., 3] -> pixels [..., 2] and depths [...] for one camera [4, 4]."""
    local = (points - camera[:3, 3]) @ camera[:3, :3]
    depth = local[..., 2]
    return local[..., :2] / depth[..., None] * k[0, 0] + k[:2, 2], depth


def _table_rgb(spec: EpisodeSpec, camera: np.ndarray, k: np.ndarray, size: int) -> np.ndarray:
    """The textured table seen by the cameras [F, 4, 4] -> [F, H, W, 3] float: each pixel's ray
    meets z = 0 where the texture (drawn in table coordinates, so it moves with the view) is."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    rays = rays @ camera[:, None, :3, :3].transpose(0, 1, 3, 2).astype(np.float32)  # [F, H, W, 3] world
    eye = camera[:, None, None, :3, 3].astype(np.float32)
    hit = eye - rays * (eye[..., 2:] / np.minimum(rays[..., 2:], -1e-3))
    x, y = hit[..., 0], hit[..., 1]
    light, dark = spec.table_colours.astype(np.float32)
    if spec.table == "wood":  # wavy grain along x, plank seams every 12 cm
        grain = np.sin(90 * y + 4 * np.sin(6 * x + float(spec.phases[0, 0])) + 2 * np.sin(19 * y + 3 * x))
        mix = 0.5 + 0.35 * grain + 0.15 * np.sin(230 * y + 9 * x)
        mix = np.where((y / 0.12) % 1.0 < 0.04, -0.4, mix)
    else:
        mix = ((np.floor(x / 0.05) + np.floor(y / 0.05)) % 2).astype(np.float32)
    rgb = dark + mix[..., None] * (light - dark)
    off_table = (np.abs(x) > 0.5) | (y > 0.4) | (y < -0.6)
    return np.where(off_table[..., None], np.float32(50), rgb)


def _faces(obj: SceneObject, centre: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A cube or cylinder as a convex polyhedron: (face [k, 3], outward unit normal [3]) pairs,
    world. A ball is a sphere, not faces; it gets its horizontal great circle, which is all its
    shadow needs."""
    r, h = obj.size / 2, obj.size / 2
    sides = 4 if obj.shape == "cube" else 16
    angles = obj.yaw + np.pi / 4 + 2 * np.pi * np.arange(sides) / sides
    radius = r * np.sqrt(2) if obj.shape == "cube" else r * 0.9
    ring = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.zeros(sides)], -1)
    up = np.array([0.0, 0.0, 1.0])
    if obj.shape == "ball":
        return [(centre + ring * np.array([1.1, 1.1, 0]), up)]
    top, bottom = centre + ring + h * up, centre + ring - h * up
    middle = angles + np.pi / sides
    walls = [(np.stack([bottom[i], bottom[(i + 1) % sides], top[(i + 1) % sides], top[i]]),
              np.array([np.cos(middle[i]), np.sin(middle[i]), 0.0])) for i in range(sides)]
    return [(top, up), (bottom, -up)] + walls


def _shade(colour, normal) -> tuple:
    """Lambert shading of an RGB colour for a face with a unit `normal`."""
    light = 0.5 + 0.6 * max(0.0, float(normal @ _LIGHT))
    return tuple(int(c) for c in np.clip(np.asarray(colour) * light, 0, 255))


def _pil_points(uv: np.ndarray) -> list[tuple[int, int]]:
    """Pixels [k, 2] -> PIL's integer points. PIL truncates float coordinates (half a pixel off
    on average); rounding keeps pixel centres at integers, as `intrinsics` has them."""
    return [tuple(p) for p in np.round(uv).astype(int).tolist()]


class _Canvas:
    """One frame being painted: the RGB image (None when only the mask is wanted) and its label
    mask, drawn with the same strokes so that they agree pixel for pixel."""

    def __init__(self, rgb: np.ndarray | None, size: int):
        self.image = None if rgb is None else Image.fromarray(rgb)
        self.mask = Image.new("L", (size, size), 0)
        self._draws = [(ImageDraw.Draw(self.mask), False)]
        if rgb is not None:
            self._draws.append((ImageDraw.Draw(self.image), True))

    def _paint(self, method: str, shape, colour, label: int, **kw):
        for draw, is_rgb in self._draws:
            getattr(draw, method)(shape, fill=tuple(int(c) for c in colour) if is_rgb else label, **kw)

    def polygon(self, uv, colour, label):
        self._paint("polygon", _pil_points(uv), colour, label)

    def line(self, uv, width, colour, label):
        self._paint("line", _pil_points(uv), colour, label, width=max(1, int(round(width))), joint="curve")

    def disc(self, centre, radius, colour, label):
        (u, v), r = _pil_points(np.reshape(centre, (1, 2)))[0], max(1, int(round(radius)))
        self._paint("ellipse", [u - r, v - r, u + r, v + r], colour, label)


def _draw_object(canvas: _Canvas, obj: SceneObject, centre, camera, k, label: int):
    """Front-facing faces of a cube or cylinder; a shaded disc with a highlight for a ball."""
    colour, eye = COLOURS[obj.colour], camera[:3, 3]
    if obj.shape == "ball":
        uv, depth = _project(centre, camera, k)
        radius = k[0, 0] * obj.size / 2 / depth
        canvas.disc(uv, radius, _shade(colour, _LIGHT * 0.7), label)
        glint, _ = _project(centre + _LIGHT * obj.size * 0.25, camera, k)
        canvas.disc(glint, radius * 0.4, np.minimum(np.asarray(colour) * 1.3 + 30, 255).astype(int), label)
        return
    for face, normal in _faces(obj, centre):
        if normal @ (eye - face[0]) > 0:  # convex: the front faces never overlap
            canvas.polygon(_project(face, camera, k)[0], _shade(colour, normal), label)


def _draw_hand(canvas: _Canvas, poses: np.ndarray, skin, camera, k):
    """A hand from its keypoints [21, 4, 4]: bones as lines, joints as discs, a palm polygon.
    The palm hides curled fingers when the back of the hand faces the camera."""
    points = poses[:, :3, 3]
    uv, depth = _project(points, camera, k)
    scale = k[0, 0] / depth  # pixels per metre at each keypoint
    skin, dark = np.asarray(skin, int), (np.asarray(skin) * 0.8).astype(int)

    def fingers():
        for f in range(5):
            chain = [1 + 4 * f + j for j in range(4)]
            canvas.line(uv[chain], 0.017 * scale[chain].mean(), skin, MASK_HAND)
            for i in chain:
                canvas.disc(uv[i], 0.005 * scale[i], dark, MASK_HAND)

    def palm():
        canvas.polygon(uv[list(_PALM_POLYGON)], skin, MASK_HAND)
        for f in range(5):
            canvas.line(uv[[0, 1 + 4 * f]], 0.006 * scale[0], dark, MASK_HAND)

    back_to_camera = poses[0, :3, 2] @ (camera[:3, 3] - points[0]) > 0
    for part in (fingers, palm) if back_to_camera else (palm, fingers):
        part()
    canvas.disc(uv[0], 0.014 * scale[0], dark, MASK_HAND)


def _shadows(spec: EpisodeSpec, geometry: Geometry, frame: int, camera, k, size: int) -> np.ndarray:
    """Soft shadows [H, W] in [0, 1] of the objects and hands on the table: points are cast
    along the light onto z = 0 and drawn like the things themselves."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)

    def cast(points):
        ground = points - points[..., 2:] / _LIGHT[2] * _LIGHT
        return _pil_points(_project(ground, camera, k)[0])

    for obj, centre in zip(spec.objects, geometry.objects[frame]):
        for face, _ in _faces(obj, centre):
            draw.polygon(cast(face), fill=255)
    for h in range(2):
        if geometry.hand_valid[frame, h]:
            points = geometry.hands[frame, h, :, :3, 3]
            draw.polygon(cast(points[list(_PALM_POLYGON)]), fill=255)
            for f in range(5):
                finger = points[[0] + [1 + 4 * f + j for j in range(4)]]
                draw.line(cast(finger), fill=255, width=max(1, size // 40))
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(size / 128)), np.float32) / 255


def _render(spec: EpisodeSpec, geometry: Geometry, indices, size: int, rgb: bool):
    """Frames [k, H, W, 3] uint8 (None unless `rgb`) and masks [k, H, W] uint8 at `indices`.
    Painter's order: table, shadows, objects far to near, then the hands (they are above)."""
    k = intrinsics(size)
    indices = np.asarray(indices, int)
    tables = _table_rgb(spec, geometry.camera[indices], k, size) if rgb else None
    frames, masks = [], []
    for n, i in enumerate(indices):
        camera = geometry.camera[i]
        image = None
        if rgb:
            shade = 1 - 0.45 * _shadows(spec, geometry, i, camera, k, size)[..., None]
            image = np.clip(tables[n] * shade, 0, 255).astype(np.uint8)
        canvas = _Canvas(image, size)
        depths = _project(geometry.objects[i], camera, k)[1]
        for j in np.argsort(-depths, kind="stable"):  # far to near
            label = MASK_TARGET if j == spec.target else MASK_OTHER
            _draw_object(canvas, spec.objects[j], geometry.objects[i, j], camera, k, label)
        wrist_depths = _project(geometry.hands[i, :, 0, :3, 3], camera, k)[1]
        for h in np.argsort(-wrist_depths, kind="stable"):
            if geometry.hand_valid[i, h]:
                _draw_hand(canvas, geometry.hands[i, h], spec.skin, camera, k)
        if rgb:
            frames.append(np.asarray(canvas.image))
        masks.append(np.asarray(canvas.mask))
    return (np.stack(frames) if rgb else None), np.stack(masks)


# ----------------------------------------------------------------------------- the source interface


def list_episodes(input_path: str = "", num_episodes: int = 64, seed: int = 0, **options) -> list[str]:
    """Keys of `num_episodes` episodes of `seed`, sorted. `input_path` is unused: the demo world
    is generated, not read (it is there for the source interface); other options are ignored."""
    return [episode_key(seed, i) for i in range(num_episodes)]


def read_episode(input_path: str, key: str, image_size: int = 128, num_frames: int = 96, fps: float = 30.0,
                 seed: int = 0, **options) -> Episode:
    """Generates the episode that `key` names: `num_frames` frames of `image_size` pixels square.
    The key carries its own seed, so `seed` (taken so that both functions accept the same
    options) is not used; neither are `input_path` and other options."""
    spec = episode_spec(*parse_key(key))
    geometry = episode_geometry(spec, num_frames)
    frames, _ = _render(spec, geometry, np.arange(num_frames), image_size, rgb=True)
    return Episode(
        source=SOURCE, episode_id=key, text=spec.text, fps=float(fps),
        hands=geometry.hands.astype(np.float32), hand_valid=geometry.hand_valid,
        camera=geometry.camera.astype(np.float32), frames=ArrayFrames(frames),
        intrinsics=intrinsics(image_size).astype(np.float32), labels=spec.labels,
    )


def render_masks(input_path: str, key: str, frame_indices, image_size: int = 128, num_frames: int = 96,
                 **options) -> np.ndarray:
    """Segmentation [k, H, W] uint8 of frames `frame_indices` of `read_episode(input_path, key,
    image_size, num_frames)`: 0 table, 1 hands, 2 the target, 3 other objects."""
    spec = episode_spec(*parse_key(key))
    return _render(spec, episode_geometry(spec, num_frames), frame_indices, image_size, rgb=False)[1]
