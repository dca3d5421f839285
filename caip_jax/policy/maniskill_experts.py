"""Demonstrations of ManiSkill3 tasks by their motion-planning experts, made in the experts' venv
(scripts/setup_maniskill.sh makes it; the planner, mplib 0.1.1, crashes under the numpy 2 of
the main venv):

    .venv-experts/bin/python -m caip_jax.policy.maniskill_experts --task PushCube-v1 --count 25 \\
        --seed 0 --out DIR --image_size 128 [--camera base_camera] [--max_steps 200]

From reset seeds seed, seed + 1, ... it runs the task's solution from mani-skill 3.0.1
(mani_skill.examples.motionplanning.panda.solutions), which plans the whole episode from the
simulator's object poses and steps the environment in pd_joint_pos. Measured over seeds 100-131:
PushCube-v1 30/30 (56-72 steps), LiftPegUpright-v1 30/32 (146-197 steps), StackCube-v1 30/30
(84-124 steps). Every step records the observation
before the action (built by caip_jax.policy.maniskill_env, as the policy sees it), the action
as the environment was stepped with it, and success after it. An episode ends at its first
success (as a policy's rollout does) and is kept; one that has not succeeded within max_steps,
or whose planning fails, is left out. Writes the kept episodes as DIR/episode_000000.npz, ...
(frames [T, H, W, 3] uint8 (absent when --image_size 0), state [T, 9], env_state [T, O],
action [T, 8] float32, success [T] bool, text, seed) and, when `count` are kept, DIR/done.json
(the request, the kept and failed seeds, episode lengths). Stops with an error once more than
`count` seeds have failed. Imports no jax: only numpy, gymnasium, mani_skill, sapien.
"""
import argparse
import importlib
import json
import os
import sys
import time

import gymnasium as gym
import numpy as np

from caip_jax.policy import maniskill_env

SOLUTIONS = {  # module of mani_skill.examples.motionplanning.panda.solutions with its solve()
    "PushCube-v1": "push_cube",
    "LiftPegUpright-v1": "lift_peg_upright",
    "StackCube-v1": "stack_cube",
}


class _EpisodeOver(Exception):
    """Raised into the planner to stop it: the episode succeeded or ran out of steps."""


class Recorder(gym.Wrapper):
    """Records (observation before, action, success after) of each step the planner takes."""

    def __init__(self, env: gym.Env, camera: str | None, max_steps: int):
        super().__init__(env)
        self.camera, self.max_steps = camera, max_steps
        self.steps, self.success, self._obs = [], False, None

    def reset(self, **kwargs):
        raw, info = self.env.reset(**kwargs)
        self.steps, self.success, self._obs = [], False, maniskill_env.observe(raw, self.camera)
        return raw, info

    def step(self, action):
        if self.success or len(self.steps) >= self.max_steps:
            raise _EpisodeOver
        action = maniskill_env.prepare_action(action, self.env.action_space)
        raw, reward, terminated, truncated, info = self.env.step(action)
        self.success = bool(np.asarray(info["success"]).item())
        self.steps.append((self._obs, action, self.success))
        self._obs = maniskill_env.observe(raw, self.camera)
        return raw, reward, terminated, truncated, info

    def episode(self, text: str, seed: int) -> dict:
        column = lambda get: np.stack([get(s) for s in self.steps])
        arrays = dict(state=column(lambda s: s[0].state), env_state=column(lambda s: s[0].env_state),
                      action=column(lambda s: s[1]), success=column(lambda s: s[2]),
                      text=np.array(text), seed=np.array(seed))
        if self.camera is not None:
            arrays["frames"] = column(lambda s: s[0].image)
        return arrays


def solver(task: str):
    if task not in SOLUTIONS:
        raise ValueError(f"no motion-planning expert for {task!r}; valid: {', '.join(sorted(SOLUTIONS))}")
    module = importlib.import_module(f"mani_skill.examples.motionplanning.panda.solutions.{SOLUTIONS[task]}")
    return module.solve


def run_episode(env: Recorder, solve, seed: int) -> str | None:
    """Runs the expert from `seed`; None when it succeeded, else why not."""
    try:
        solve(env, seed=seed, debug=False, vis=False)
    except _EpisodeOver:
        pass
    except Exception as e:  # the planner's own failures (no valid grasp, an IK or screw failure)
        if not env.steps:
            return f"planning failed: {type(e).__name__}: {e}"
        if not env.success:
            return f"planning failed after {len(env.steps)} steps: {type(e).__name__}: {e}"
    if env.success:
        return None
    if len(env.steps) >= env.max_steps:
        return f"no success within {env.max_steps} steps"
    return f"the plan ended after {len(env.steps)} steps without success"


def _write_atomic(path: str, write) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def _save_npz(path: str, arrays: dict) -> None:
    def write(temporary):
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
    _write_atomic(path, write)


def generate(task: str, count: int, seed: int, out: str, image_size: int, camera: str | None, max_steps: int) -> dict:
    """Writes `count` successful expert episodes to `out`; returns what done.json holds."""
    solve = solver(task)
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"numpy {np.__version__}: the experts' planner (mplib 0.1.1) segfaults under numpy 2; run this "
                           "with .venv-experts/bin/python (made by scripts/setup_maniskill.sh)")
    request = dict(task=task, count=count, seed=seed, image_size=image_size,
                   camera=(camera or maniskill_env.DEFAULT_CAMERA) if image_size else None, max_steps=max_steps)
    done_path = os.path.join(out, "done.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("request") == request:
            return done
        raise ValueError(f"{out} holds demonstrations made with {done.get('request')}, not {request}: give another --out")
    # ManiSkillTask checks the camera; its gym environment is the one recorded (same observations).
    task_env = maniskill_env.make(task, image_size=image_size or None, camera=camera, max_steps=max_steps)
    os.makedirs(out, exist_ok=True)
    env = Recorder(task_env._env, task_env.camera, max_steps)
    kept, failed, lengths = [], {}, []
    start = time.time()
    try:
        s = seed
        while len(kept) < count:
            why = run_episode(env, solve, s)
            if why is None:
                _save_npz(os.path.join(out, f"episode_{len(kept):06d}.npz"), env.episode(task_env.instruction, s))
                kept.append(s)
                lengths.append(len(env.steps))
                print(f"{task} seed {s}: success in {len(env.steps)} steps", file=sys.stderr)
            else:
                failed[str(s)] = why
                print(f"{task} seed {s}: {why}", file=sys.stderr)
                if len(failed) > count:
                    raise RuntimeError(f"the {task} expert failed on {len(failed)} seeds ({', '.join(failed)}) while "
                                       f"keeping {len(kept)} of {count}: more failures than demonstrations asked for")
            s += 1
    finally:
        task_env.close()
    done = dict(request=request, kept_seeds=kept, failed_seeds=[int(k) for k in failed], failures=failed,
                lengths=lengths, seconds=round(time.time() - start, 1))
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(done, f, indent=1)
    _write_atomic(done_path, write)
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help=", ".join(sorted(SOLUTIONS)))
    parser.add_argument("--count", type=int, required=True, help="successful episodes to keep")
    parser.add_argument("--seed", type=int, required=True, help="the first reset seed")
    parser.add_argument("--out", required=True, help="directory for episode_XXXXXX.npz and done.json")
    parser.add_argument("--image_size", type=int, default=128, help="camera frames' side in px; 0: none")
    parser.add_argument("--camera", default=None, help=f"default {maniskill_env.DEFAULT_CAMERA}")
    parser.add_argument("--max_steps", type=int, default=maniskill_env.DEFAULT_MAX_STEPS)
    args = parser.parse_args(argv)
    try:
        done = generate(args.task, args.count, args.seed, args.out, args.image_size, args.camera, args.max_steps)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"maniskill_experts: {e}")
    print(json.dumps(dict(kept=len(done["kept_seeds"]), failed_seeds=done["failed_seeds"], lengths=done["lengths"])))


if __name__ == "__main__":
    main()
