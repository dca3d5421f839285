"""ManiSkill3 (mani-skill 3.0.1, SAPIEN 3.0.3, CPU simulation) behind
caip_jax.policy.environment's interface.

Install with scripts/setup_maniskill.sh (after scripts/setup.sh). Every task runs the plain
Panda ("panda"; StackCube's default "panda_wristcam" adds a hand camera, 5x slower to render)
on the CPU PhysX backend, one environment per process, at 20 actions per second (100 Hz physics).

Actions are ManiSkill's `pd_joint_pos` control mode, the one its motion-planning experts
(mani_skill/examples/motionplanning/panda/solutions) act in: 8 numbers, the 7 arm joints'
absolute target angles (rad, clipped to the joint limits) and the gripper in [-1, 1] (1 open,
-1 closed). The policy acts in the same mode, so demonstrations are replayable as they are:
replayed here, the experts' actions reproduce their env_state and frames bit for bit.

Observations: `state` is the robot's proprioception, qpos [9] (7 arm joints, 2 finger joints);
`env_state` is ManiSkill's flat "state" observation: qpos [9], qvel [9], the TCP pose [7] and
then the task's objects, PushCube-v1 the goal position [3] and the cube's pose [7] (35 numbers),
LiftPegUpright-v1 the peg's pose [7] (32), StackCube-v1 both cubes' poses and the TCP-to-cube
and cube-to-cube offsets (48). The image is one fixed camera, the tasks' own `base_camera`
(eye [0.3, 0, 0.6] looking at [-0.1, 0, 0.1], 90 degrees), rendered at image_size px, uint8
[H, W, 3]. Success is ManiSkill's info["success"] after the action.

`reset(seed)` draws the placement (and the robot's initial joint noise) from the seed alone:
the same seed gives the same configuration in any process, in the main venv (numpy 2) and in
the experts' (numpy 1.26). The experts plan whole episodes, so there is no per-step expert:
demonstrations come from `caip_jax.policy.maniskill_experts`, run in .venv-experts (its planner,
mplib 0.1.1, crashes under numpy 2). They build observations and step actions with this module's
`gym_env`, `observe` and `prepare_action`; keep it free of jax.

SAPIEN renders through Vulkan, on the CPU with Mesa's lavapipe; Debian 12's own Mesa (22.3)
lacks VK_KHR_external_semaphore_fd, so it is bookworm-backports' (VK_ICD_FILENAMES, set below
when unset). Without images (image_size None) nothing renders, but the scene's materials still
need a Vulkan device. The first frame of a process takes about 12 s (shader compilation); then
a step with a 128 px frame took 60-75 ms (64 px: 45 ms) on 2 cores shared with another busy
process, one without a frame 3-5 ms.
"""
import glob
import json
import logging
import os
import subprocess
import warnings

LAVAPIPE_ICD = "/usr/share/vulkan/icd.d/lvp_icd.json"
# Read by the Vulkan loader when SAPIEN makes its instance; set before sapien is imported.
if "VK_ICD_FILENAMES" not in os.environ and os.path.exists(LAVAPIPE_ICD):
    os.environ["VK_ICD_FILENAMES"] = LAVAPIPE_ICD
# mani_skill imports mujoco (pytorch_kinematics' MJCF reader), which picks its OpenGL platform
# then: without MUJOCO_GL it takes glfw, and Meta-World could no longer render in this process.
os.environ.setdefault("MUJOCO_GL", "osmesa")

import gymnasium as gym  # noqa: E402
import mani_skill.envs  # noqa: E402,F401  (registers the tasks)
import numpy as np  # noqa: E402

from caip_jax.policy.environment import Observation  # noqa: E402

CONTROL_MODE = "pd_joint_pos"
ROBOT = "panda"
STATE_DIM = 9  # qpos: 7 arm joints, 2 finger joints (the flat state observation's first 9)
DEFAULT_TASKS = ("PushCube-v1", "LiftPegUpright-v1", "StackCube-v1")
INSTRUCTIONS = {
    "PushCube-v1": "push the blue cube to the red and white target",
    "LiftPegUpright-v1": "lift the peg upright",
    "StackCube-v1": "stack the red cube on the green cube",
}
DEFAULT_CAMERA = "base_camera"
# The experts take 60-170 steps; ManiSkill's own limit (50) is for its RL policies.
DEFAULT_MAX_STEPS = 200
# The experts' interpreter: CAIP_EXPERTS_PYTHON, else the venv scripts/setup_maniskill.sh makes
# beside this checkout.
EXPERTS_PYTHON = os.environ.get("CAIP_EXPERTS_PYTHON") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".venv-experts", "bin", "python")
SETUP_FIX = f"run scripts/setup_maniskill.sh (Mesa's lavapipe from bookworm-backports) and set VK_ICD_FILENAMES={LAVAPIPE_ICD}"


def tasks() -> list[str]:
    return sorted(INSTRUCTIONS)


def instruction(task: str) -> str:
    return INSTRUCTIONS[_check_task(task)]


def _check_task(task: str) -> str:
    if task not in INSTRUCTIONS:
        raise ValueError(f"maniskill task {task!r} is unknown; valid: {', '.join(tasks())}")
    return task


def gym_env(task: str, image_size: int | None, max_steps: int) -> gym.Env:
    """The ManiSkill environment of `task` as this module acts in it (robot, control mode,
    observations with one camera at image_size px, or none and no renderer when None)."""
    _check_task(task)
    images = dict(obs_mode="rgb+state", render_backend="cpu", sensor_configs=dict(width=image_size, height=image_size))
    try:
        return gym.make(task, robot_uids=ROBOT, control_mode=CONTROL_MODE, sim_backend="cpu",
                        max_episode_steps=max_steps, render_mode=None,
                        **(images if image_size else dict(obs_mode="state", render_backend="none")))
    except RuntimeError as e:
        if any(sign in str(e) for sign in ("vk::", "Vulkan", "physical device", "rendering device")):
            raise RuntimeError(f"SAPIEN found no usable Vulkan device ({e}): {SETUP_FIX}") from None
        raise


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def observe(raw, camera: str | None) -> Observation:
    """A ManiSkill observation (of gym_env: a [1, O] tensor, or a dict with "state" and
    "sensor_data" when rendering) -> Observation; camera None: no image."""
    env_state = _numpy(raw["state"] if isinstance(raw, dict) else raw)[0].astype(np.float32)
    image = None
    if camera is not None:
        image = np.ascontiguousarray(_numpy(raw["sensor_data"][camera]["rgb"])[0], dtype=np.uint8)
    return Observation(image, env_state[:STATE_DIM].copy(), env_state)


def prepare_action(action, space: gym.spaces.Box) -> np.ndarray:
    """The action as the environment is stepped with it: float32, clipped to the action space."""
    action = np.asarray(action, np.float32)
    if action.shape != space.shape:
        raise ValueError(f"action of shape {action.shape}, the environment takes {space.shape}")
    return np.clip(action, space.low, space.high)


class ManiSkillTask:
    """One ManiSkill3 task; see the module docstring."""

    def __init__(self, task: str, image_size: int | None = 128, camera: str | None = None,
                 max_steps: int | None = None):
        self.task, self.instruction = task, instruction(task)
        self.max_steps = max_steps or DEFAULT_MAX_STEPS
        self.camera = (camera or DEFAULT_CAMERA) if image_size else None
        self.image_size = image_size
        self._env = gym_env(task, image_size, self.max_steps)
        base = self._env.unwrapped
        if self.camera is not None and self.camera not in base._sensors:
            cameras = ", ".join(base._sensors)
            self._env.close()
            raise ValueError(f"camera {self.camera!r} is not in {task}; valid: {cameras}")
        self.fps = float(base.control_freq)
        self.action_dim = int(self._env.action_space.shape[0])

    def reset(self, seed: int) -> Observation:
        raw, _ = self._env.reset(seed=int(seed))
        return observe(raw, self.camera)

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        with warnings.catch_warnings():  # ManiSkill calls np.isnan on a tensor: numpy 2 deprecates its __array_wrap__
            warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
            raw, _, _, _, info = self._env.step(prepare_action(action, self._env.action_space))
        return observe(raw, self.camera), bool(_numpy(info["success"]).item())

    def expert_action(self) -> np.ndarray:
        raise NotImplementedError(
            "ManiSkill's experts are motion planners that plan whole episodes, not per-step policies: make "
            "demonstrations with `.venv-experts/bin/python -m caip_jax.policy.maniskill_experts` (see its docstring)")

    def expert_demonstrations(self, count: int, seed: int, scratch: str):
        """`count` successful expert episodes from reset seeds seed, seed + 1, ..., made by
        caip_jax.policy.maniskill_experts in the experts' venv into `scratch` (a local directory
        it may fill) -> (an iterator of RecordedEpisode, one loaded at a time; the seeds whose
        episode the expert failed)."""
        from caip_jax.policy.lerobot_writer import RecordedEpisode

        if not os.path.exists(EXPERTS_PYTHON):
            raise FileNotFoundError(f"the ManiSkill experts' venv is missing ({EXPERTS_PYTHON}): run scripts/setup_maniskill.sh, "
                                    "or point CAIP_EXPERTS_PYTHON at its python")
        command = [EXPERTS_PYTHON, "-m", "caip_jax.policy.maniskill_experts", "--task", self.task, "--count", str(count),
                   "--seed", str(seed), "--out", scratch, "--image_size", str(self.image_size or 0),
                   "--max_steps", str(self.max_steps)] + (["--camera", self.camera] if self.camera else [])
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        last = ""
        with subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as experts:
            for line in experts.stderr:  # their progress, a line an episode
                logging.info("experts: %s", line.rstrip())
                last = line.strip() or last
        if experts.returncode != 0:
            raise RuntimeError(f"the {self.task} experts failed ({' '.join(command)}): {last or f'exit status {experts.returncode}'}")
        with open(os.path.join(scratch, "done.json")) as f:
            failed = json.load(f)["failed_seeds"]

        def episodes():
            for path in sorted(glob.glob(os.path.join(scratch, "episode_*.npz"))):
                with np.load(path) as e:
                    yield RecordedEpisode(frames=e["frames"] if "frames" in e else None, state=e["state"],
                                          env_state=e["env_state"], action=e["action"], success=e["success"],
                                          text=str(e["text"]))

        return episodes(), failed

    def close(self) -> None:
        self._env.close()


make = ManiSkillTask
