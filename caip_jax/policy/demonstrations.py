"""Demonstrations: scripted-expert episodes of a simulated task written as a LeRobot dataset,
and any LeRobot dataset (v2.0 / v2.1 / v3.0: the user's robot demonstrations or the simulated
ones) read back into what a policy trains on. Both go through the same reader, the layouts of
caip_jax/data/sources/lerobot.py.

Columns are named as in LeRobot, each a spec "name" or "name[a:b]" (a slice of a vector):
the camera `video_key` (e.g. "observation.images.corner"), `state_key` (proprioception,
"observation.state"), `action_key` ("action") and `env_state_key` (the simulator state of
simulated data, "observation.environment_state", which only the `state` oracle encoder reads).
"""
import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import tqdm

from caip_jax.data.schema import EpisodeError, Frames
from caip_jax.data.sources import lerobot
from caip_jax.policy import lerobot_writer
from caip_jax.policy.environment import Environment

GENERATION = "meta/generation.json"  # how generated demonstrations were made (for reuse)
# Demonstration i uses reset seed `seed + i`, held-out rollout j `seed + HELD_OUT_SEED_OFFSET + j`:
# never a demonstration's placement.
HELD_OUT_SEED_OFFSET = 1_000_000


@dataclasses.dataclass
class Demonstration:
    """One episode of n steps: frames (None when not read), state [n, S], action [n, A],
    env_state [n, O] or None, the instruction and the episode's key."""

    frames: Frames | None
    state: np.ndarray
    action: np.ndarray
    env_state: np.ndarray | None
    text: str
    key: str


def record_expert(env: Environment, seed: int) -> lerobot_writer.RecordedEpisode:
    """The scripted expert from reset seed `seed` until success or env.max_steps."""
    obs = env.reset(seed)
    steps = []
    for _ in range(env.max_steps):
        action = env.expert_action()
        following, success = env.step(action)
        steps.append((obs, action, success))
        obs = following
        if success:
            break
    column = lambda get: np.stack([get(s) for s in steps])
    return lerobot_writer.RecordedEpisode(
        frames=None if steps[0][0].image is None else column(lambda s: s[0].image),
        state=column(lambda s: s[0].state), env_state=column(lambda s: s[0].env_state),
        action=column(lambda s: s[1]), success=column(lambda s: s[2]), text=env.instruction)


def generate(env: Environment, root: str, count: int, seed: int, description: dict) -> dict:
    """Writes `count` successful expert episodes of `env` to the LeRobot dataset `root` (a
    local directory), from reset seeds seed, seed + 1, ... (an episode the expert fails is left
    out and counted). If `root` already holds demonstrations made the same way (`description`:
    suite, task, camera, image size...), they are kept. The dataset is written beside `root` and
    renamed into place when whole, so a run cut short leaves no partial dataset there (a
    leftover partial one is removed and made again). Returns the generation record."""
    record = request(env, count, seed, description)
    path = os.path.join(root, GENERATION)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("request") != record:
            raise ValueError(f"{root} holds demonstrations made with {stored.get('request')}, not {record}: "
                             "give another --out or remove that directory")
        return stored
    if os.path.isdir(root) and os.listdir(root):
        if not set(os.listdir(root)) <= {"meta", "data", "videos"}:
            raise ValueError(f"{root} holds other files than a LeRobot dataset and no {GENERATION}: give another directory")
        logging.warning("%s holds a dataset cut short: making it again", root)
        shutil.rmtree(root)
    partial = f"{root.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    camera_key = f"observation.images.{description['camera']}" if description.get("image_size") else None
    writer = lerobot_writer.Writer(partial, env.fps, camera_key, robot_type=description.get("suite", "unknown"))
    if hasattr(env, "expert_demonstrations"):  # experts that plan whole episodes, in their own process
        scratch = f"{partial}.experts"
        shutil.rmtree(scratch, ignore_errors=True)
        episodes, failed = env.expert_demonstrations(count, seed, scratch)
        for episode in tqdm.tqdm(episodes, total=count, unit="demo", desc=f"demonstrations ({env.task})"):
            writer.add(episode)
        shutil.rmtree(scratch)
    else:
        failed = _record_per_step_expert(env, writer, count, seed)
    writer.close()
    stored = dict(request=record, expert_failed_seeds=failed, camera_key=camera_key)
    with open(os.path.join(partial, GENERATION), "w") as f:
        json.dump(stored, f, indent=2)
    if os.path.isdir(root):
        os.rmdir(root)  # empty (checked above)
    os.replace(partial, root)
    if failed:
        logging.warning("%s: the expert failed from seeds %s (left out)", env.task, failed)
    return stored


def _record_per_step_expert(env: Environment, writer: lerobot_writer.Writer, count: int, seed: int) -> list[int]:
    """Adds `count` successful episodes of env's per-step expert to `writer`, from reset seeds
    seed, seed + 1, ...; returns the seeds it failed from."""
    kept, failed, next_seed = 0, [], seed
    with tqdm.tqdm(total=count, unit="demo", desc=f"demonstrations ({env.task})") as bar:
        while kept < count:
            if len(failed) > count:
                raise RuntimeError(f"the scripted expert of {env.task} failed {len(failed)} episodes (seeds {failed[:10]}...)")
            episode = record_expert(env, next_seed)
            if episode.success[-1]:
                writer.add(episode)
                kept += 1
                bar.update()
            else:
                failed.append(next_seed)
            next_seed += 1
    return failed


def request(env: Environment, count: int, seed: int, description: dict) -> dict:
    """What demonstrations made by `generate` depend on (their cache identity)."""
    return dict(description, count=count, seed=seed, action_dim=env.action_dim)


def read(root: str, video_key: str | None = None, state_key: str = lerobot_writer.STATE,
         action_key: str = lerobot_writer.ACTION, env_state_key: str | None = None,
         max_episodes: int | None = None) -> list[Demonstration]:
    """The episodes of the LeRobot dataset `root` (the first `max_episodes`); frames only with
    a `video_key`, env_state only with an `env_state_key`. Raises ValueError naming a column
    the dataset lacks (and the ones it has), EpisodeError naming a broken episode."""
    info, layout = lerobot._info(root)
    features = info["features"]
    for what, spec in (("state_key", state_key), ("action_key", action_key), ("env_state_key", env_state_key)):
        if spec and lerobot._parse_spec(spec)[0] not in features:
            raise ValueError(f"{what}={spec!r}: {root} has no such column; it has {sorted(features)}")
    cameras = [name for name, f in features.items() if f.get("dtype") == "video"]
    if video_key and video_key not in cameras:
        raise ValueError(f"video_key={video_key!r} is not a camera of {root}; cameras: {cameras}")
    tasks = layout.tasks(root)
    columns = ["episode_index", "frame_index", "task_index"]
    columns += list(dict.fromkeys(lerobot._parse_spec(s)[0] for s in (state_key, action_key, env_state_key) if s))
    out = []
    for index in sorted(layout.indices(root))[:max_episodes]:
        key = f"episode_{index:06d}"
        location = layout.locate(root, info, index, video_key or (cameras[0] if cameras else ""))
        table = lerobot._rows(location, index, columns, key)
        text = tasks.get(table.column("task_index")[0].as_py())
        if text is None:
            raise EpisodeError(f"{key}: task_index {table.column('task_index')[0]} is not in the task table")
        values = lambda spec: lerobot._values(table, spec, key).astype(np.float32)
        out.append(Demonstration(
            frames=lerobot._frames(location, table.num_rows, key) if video_key else None,
            state=values(state_key), action=values(action_key),
            env_state=values(env_state_key) if env_state_key else None, text=text, key=key))
    if not out:
        raise ValueError(f"{root} holds no episodes")
    return out
