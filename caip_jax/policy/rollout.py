"""Closed-loop rollouts with action chunking: observe, predict a chunk of `horizon` actions,
execute the first `execute` of them, observe again, until the task succeeds or the episode's
step budget runs out. A rollout is a function of its seed: the environment's placement and
the flow noise (`fold_in(key(seed), step)`) both come from it.
"""
import collections
import dataclasses
import time

import jax
import numpy as np

from caip_jax.policy.encoders import FrozenEncoder
from caip_jax.policy.environment import Environment
from caip_jax.policy import train
from caip_jax.policy.train import TrainedPolicy


@dataclasses.dataclass
class Rollout:
    """seed; success; steps taken; actions [steps, A]; frames [k, H, W, 3] when recorded."""

    seed: int
    success: bool
    steps: int
    actions: np.ndarray
    frames: np.ndarray | None = None


class Timer:
    """Wall and CPU seconds spent per named part (this process, all its threads)."""

    def __init__(self):
        self.wall, self.cpu = collections.Counter(), collections.Counter()

    def __call__(self, part: str):
        timer = self

        class Span:
            def __enter__(self):
                self.start = time.perf_counter(), time.process_time()

            def __exit__(self, *_):
                timer.wall[part] += time.perf_counter() - self.start[0]
                timer.cpu[part] += time.process_time() - self.start[1]

        return Span()


def rollout(env: Environment, encoder: FrozenEncoder, policy: TrainedPolicy, seed: int,
            record_frames: bool = False, timer: Timer | None = None) -> Rollout:
    """One episode of `policy` on `encoder`'s features of `env` from reset seed `seed`;
    `timer` adds the time spent simulating and rendering ("simulate"), encoding and acting."""
    timer = timer or Timer()
    with timer("simulate"):
        obs = env.reset(seed)
    instruction = np.array([policy.instruction_id(env.instruction)], np.int32)
    key = train.key(seed)
    actions, frames, success = [], [obs.image] if record_frames else None, False
    while len(actions) < env.max_steps and not success:
        with timer("encode"):
            features = encoder.encode(obs.image[None] if encoder.needs_images else None, [env.instruction],
                                      obs.env_state[None])
        with timer("act"):
            chunk = policy.act(features, obs.state[None], instruction, jax.random.fold_in(key, len(actions)))[0]
        for action in chunk[: policy.config.execute]:
            with timer("simulate"):
                obs, success = env.step(action)
            actions.append(action)
            if record_frames:
                frames.append(obs.image)
            if success or len(actions) == env.max_steps:
                break
    return Rollout(seed, success, len(actions), np.stack(actions),
                   np.stack(frames) if record_frames and frames[0] is not None else None)
