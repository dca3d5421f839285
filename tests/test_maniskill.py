"""ManiSkill3 through the policy's environment interface: resets are a function of their seed,
the motion-planning experts' demonstrations (made in .venv-experts) replay exactly in the main
venv's adapter, and bad names are refused by name. Needs scripts/setup_maniskill.sh."""
import glob
import json
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("mani_skill") is None:  # not imported here: maniskill_env sets MUJOCO_GL first
    pytest.skip("mani-skill is not installed: pip install -e '.[maniskill]'", allow_module_level=True)

from caip_jax.policy import maniskill_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERTS_PYTHON = os.path.join(ROOT, ".venv-experts", "bin", "python")
TASK = "PushCube-v1"
SIZE = 64

ICD = os.environ.get("VK_ICD_FILENAMES", maniskill_env.LAVAPIPE_ICD)  # maniskill_env sets it when lavapipe is there
needs_vulkan = pytest.mark.skipif(
    not os.path.exists(ICD), reason=f"no Vulkan driver ({ICD} absent): run scripts/setup_maniskill.sh")
needs_experts = pytest.mark.skipif(
    not os.path.exists(EXPERTS_PYTHON), reason="no .venv-experts: run scripts/setup_maniskill.sh")


@needs_vulkan
def test_reset_is_a_function_of_the_seed():
    """Without images (quicker: no renderer); the replay test below checks that the frames are
    a function of the seed too."""
    env = maniskill_env.make(TASK, image_size=None)
    try:
        first, again, other = env.reset(3), env.reset(3), env.reset(4)
        assert first.image is None and first.state.shape == (9,) and first.env_state.shape == (35,)
        assert env.action_dim == 8 and env.fps == 20.0 and env.max_steps == 200
        np.testing.assert_array_equal(first.env_state, again.env_state)
        assert np.abs(first.env_state - other.env_state).max() > 0.01  # another cube and goal placement
        with pytest.raises(NotImplementedError, match="maniskill_experts"):
            env.expert_action()
    finally:
        env.close()


@needs_vulkan
@needs_experts
def test_expert_demonstrations_replay_in_the_adapter(tmp_path):
    """Two PushCube demonstrations made by the experts' venv (numpy 1.26), replayed in this one
    (numpy 2): reset to the episode's seed and step its actions. The replay has been bit-identical
    (SAPIEN's CPU PhysX is deterministic, and both venvs run the same SAPIEN build on the same
    machine); the tolerance allows only float32 rounding, far below the millimetres a cube moves
    in a step, and the frames may differ by rounding too (measured identical)."""
    out = str(tmp_path / "demos")
    command = [EXPERTS_PYTHON, "-m", "caip_jax.policy.maniskill_experts", "--task", TASK, "--count", "2",
               "--seed", "0", "--out", out, "--image_size", str(SIZE)]
    experts = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # meanwhile this process starts its renderer (its first frame takes seconds: shader compilation)
        env = maniskill_env.make(TASK, image_size=SIZE)
        _, errors = experts.communicate(timeout=300)
    finally:
        experts.kill()
    try:
        assert experts.returncode == 0, errors[-3000:]
        episodes = sorted(glob.glob(os.path.join(out, "episode_*.npz")))
        assert len(episodes) == 2 and os.path.exists(os.path.join(out, "done.json"))
        for path in episodes:
            episode = np.load(path)
            steps = len(episode["action"])
            assert 20 < steps <= 200 and episode["frames"].shape == (steps, SIZE, SIZE, 3)
            assert episode["success"][-1] and not episode["success"][:-1].any()
            assert str(episode["text"]) == maniskill_env.instruction(TASK)
            obs, states, frames, successes = env.reset(int(episode["seed"])), [], [], []
            for action in episode["action"]:
                states.append(obs.env_state)
                frames.append(obs.image)
                obs, success = env.step(action)
                successes.append(success)
            np.testing.assert_allclose(np.stack(states), episode["env_state"], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(np.stack(states)[:, :9], episode["state"])
            assert np.abs(np.stack(frames).astype(np.float32) - episode["frames"]).mean() < 0.5
            assert successes == list(episode["success"])
    finally:
        env.close()


def test_bad_names_are_refused_by_name():
    from caip_jax.policy import maniskill_experts

    for make in (lambda: maniskill_env.make("PushCube-v9", image_size=None), lambda: maniskill_env.instruction("PushCube-v9"),
                 lambda: maniskill_experts.solver("PushCube-v9")):
        with pytest.raises(ValueError) as error:
            make()
        message = str(error.value)
        assert "\n" not in message and "'PushCube-v9'" in message
        assert all(task in message for task in maniskill_env.DEFAULT_TASKS)


@needs_vulkan
@needs_experts
def test_policy_evaluation_on_maniskill_end_to_end(tmp_path):
    """caip-policy-eval's path with --suite maniskill: the experts' episodes become a LeRobot
    dataset (read back through the robot-data reader), which replays to success in the adapter
    from its seed; a policy trains on them and is rolled out; the table has the row."""
    from caip_jax.policy import config as policy_config
    from caip_jax.policy import demonstrations, evaluate

    config = policy_config.policy_config("tiny")
    config.total_steps, config.batch_size, config.model.depth = 20, 16, 1
    run = evaluate.Simulated("maniskill", [TASK], demos=2, episodes=1, image_size=SIZE, max_steps=20, strips=0,
                             baselines=False)
    results = evaluate.evaluate_simulated(["state"], config, run, str(tmp_path / "eval"))
    assert results["episodes"][TASK] == {"state": 1} and results["missing"] == []
    (root,) = glob.glob(str(tmp_path / "eval" / "demos" / "*"))
    with open(os.path.join(root, demonstrations.GENERATION)) as f:
        failed = json.load(f)["expert_failed_seeds"]
    read = demonstrations.read(root, video_key=f"observation.images.{maniskill_env.DEFAULT_CAMERA}",
                               env_state_key="observation.environment_state")
    assert len(read) == 2 and read[0].text == maniskill_env.instruction(TASK)
    first_seed = min(set(range(len(failed) + 2)) - set(failed))
    env = maniskill_env.make(TASK, image_size=None)
    try:
        obs, success = env.reset(first_seed), False
        np.testing.assert_allclose(obs.env_state, read[0].env_state[0], atol=1e-5)
        for action in read[0].action:
            obs, success = env.step(action)
        assert success and len(read[0].frames) == len(read[0].action)
        assert read[0].frames.read(np.array([0])).shape == (1, SIZE, SIZE, 3)
    finally:
        env.close()


@needs_vulkan
def test_a_missing_or_wrong_experts_venv_is_named(tmp_path, monkeypatch):
    """Missing: the fix is named. The wrong one (here the main venv's python, numpy 2): its one line."""
    from caip_jax.policy import demonstrations

    env = maniskill_env.make(TASK, image_size=None)
    try:
        for python, error, message in (
                (tmp_path / "nowhere" / "python", FileNotFoundError, r"experts' venv is missing .*nowhere.*run scripts/setup_maniskill.sh"),
                (sys.executable, RuntimeError, rf"the {TASK} experts failed .*: maniskill_experts: numpy \S+: the experts' planner")):
            monkeypatch.setattr(maniskill_env, "EXPERTS_PYTHON", str(python))
            with pytest.raises(error, match=message):
                demonstrations.generate(env, str(tmp_path / "demos"), 1, 0, dict(suite="maniskill", task=TASK, image_size=None))
            assert not os.path.exists(tmp_path / "demos")  # nothing reported as made
    finally:
        env.close()


def test_a_missing_vulkan_driver_is_one_line_naming_the_fix(tmp_path):
    """SAPIEN needs a Vulkan device even without images: a driver file that is not there (as on a
    machine without backports' lavapipe) is one line naming the setup script."""
    program = "from caip_jax.policy import maniskill_env; maniskill_env.make('PushCube-v1', image_size=None)"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, VK_ICD_FILENAMES=str(tmp_path / "no_icd.json")))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: SAPIEN found no usable Vulkan device") and "scripts/setup_maniskill.sh" in last, done.stderr[-2000:]
