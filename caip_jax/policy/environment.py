"""The one small interface a simulator offers the policy: reset to a seeded configuration,
step with an action, say whether the task succeeded, and give a scripted expert's action.

Suites are adapters behind it (caip_jax/policy/metaworld_env.py, maniskill_env.py), imported
only when asked for, so that nothing here needs a simulator installed. A suite whose experts
plan whole episodes (ManiSkill's motion planners) offers `expert_demonstrations` instead of a
per-step `expert_action`.
"""
import dataclasses
import importlib
from typing import Protocol

import numpy as np

SUITES = {"metaworld": "caip_jax.policy.metaworld_env", "maniskill": "caip_jax.policy.maniskill_env"}


@dataclasses.dataclass
class Observation:
    """image [H, W, 3] uint8 (None when the environment does not render); state [S] float32,
    the robot's proprioception (what a real robot also measures); env_state [O] float32, the
    simulator's full state (objects and goal too: the `state` oracle encoder's input)."""

    image: np.ndarray | None
    state: np.ndarray
    env_state: np.ndarray


class Environment(Protocol):
    task: str
    instruction: str  # what the policy is told
    action_dim: int
    fps: float
    max_steps: int  # an episode that has not succeeded by then fails

    def reset(self, seed: int) -> Observation:
        """The configuration (object and goal placement) of `seed`; the same seed, the same one."""
        ...

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        """Applies action [A] (clipped to the action space) -> (observation, success)."""
        ...

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action [A] for the current state, clipped to the action space."""
        ...

    def close(self) -> None: ...


def _suite(suite: str):
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} is unknown; valid: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[suite])


def tasks(suite: str) -> list[str]:
    """The task names of `suite`."""
    return _suite(suite).tasks()


def default_tasks(suite: str) -> list[str]:
    """The tasks `suite` is judged on by default (those that tell encoders apart, and controls)."""
    return list(_suite(suite).DEFAULT_TASKS)


def controls(suite: str) -> dict[str, str]:
    """Tasks of `suite` that do not tell encoders apart -> why (reported, not pooled)."""
    return dict(getattr(_suite(suite), "CONTROLS", {}))


def make(suite: str, task: str, image_size: int | None = 128, camera: str | None = None,
         max_steps: int | None = None) -> Environment:
    """The environment of `task` in `suite`; image_size None: no rendering (state-only)."""
    return _suite(suite).make(task, image_size=image_size, camera=camera, max_steps=max_steps)
