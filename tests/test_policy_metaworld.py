"""Meta-World through the policy's environment interface: demonstrations written as LeRobot
and read back are the expert's, rollouts are a function of their seed, a state policy learns
an easy task, and bad input is refused by name."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from caip_jax.policy import config as policy_config
from caip_jax.policy import demonstrations, encoders, environment, rollout, train
from caip_jax.policy.dataset import TrainingSet

TASK = "button-press-v3"
ENV_STATE = "observation.environment_state"


def describe(image_size):
    return dict(suite="metaworld", task=TASK, camera="corner", image_size=image_size)


def state_policy(root: str, demos: int, steps: int, seed: int = 0) -> tuple[train.TrainedPolicy, list]:
    """A tiny policy on the `state` encoder, trained on `demos` expert episodes (no rendering)."""
    env = environment.make("metaworld", TASK, image_size=None, max_steps=150)
    demonstrations.generate(env, os.path.join(root, "demos"), demos, seed, describe(None))
    env.close()
    read = demonstrations.read(os.path.join(root, "demos"), env_state_key=ENV_STATE)
    oracle = encoders.StateOracle()
    data = TrainingSet.build([oracle.encode(None, [d.text], d.env_state) for d in read], [d.state for d in read],
                             [d.action for d in read], [d.text for d in read], horizon=8)
    config = policy_config.policy_config("tiny")
    config.total_steps, config.seed = steps, seed
    return train.train(config, data, os.path.join(root, "policy"), devices=jax.devices()[:1]), read


def test_demonstrations_written_then_read_are_the_experts(tmp_path):
    env = environment.make("metaworld", TASK, image_size=64)
    stored = demonstrations.generate(env, str(tmp_path), 2, seed=5, description=describe(64))
    read = demonstrations.read(str(tmp_path), video_key=stored["camera_key"], env_state_key=ENV_STATE)
    assert [d.key for d in read] == ["episode_000000", "episode_000001"]
    for seed, demo in zip((5, 6), read):  # the expert again, by hand, from the same seeds
        obs, actions, states, frames, success = env.reset(seed), [], [], [], False
        while not success:
            states.append(obs.env_state)
            frames.append(obs.image)
            actions.append(env.expert_action())
            obs, success = env.step(actions[-1])
        np.testing.assert_array_equal(demo.action, np.stack(actions))  # float32, exactly
        np.testing.assert_array_equal(demo.env_state, np.stack(states))
        np.testing.assert_array_equal(demo.state, np.stack(states)[:, :4])
        assert demo.text == env.instruction == "button press"
        decoded, rendered = demo.frames.read(np.arange(len(actions))).astype(float), np.stack(frames)
        assert decoded.shape == rendered.shape == (len(actions), 64, 64, 3)
        # H.264 (crf 10, 4:2:0) loses a few levels of 255 at 64 px, but each decoded frame is
        # still nearest to its own step's render of all the episode's.
        distance = np.abs(decoded[:, None] - rendered[None]).mean(axis=(2, 3, 4))  # [n, n]
        assert distance.diagonal().mean() < 6
        np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(len(actions)))
    env.close()
    # Asked again the same way: kept. Asked otherwise: refused, naming both.
    mtime = os.path.getmtime(tmp_path / "meta" / "info.json")
    demonstrations.generate(env, str(tmp_path), 2, seed=5, description=describe(64))
    assert os.path.getmtime(tmp_path / "meta" / "info.json") == mtime
    with pytest.raises(ValueError, match="holds demonstrations made with .* not .*'count': 3"):
        demonstrations.generate(env, str(tmp_path), 3, seed=5, description=describe(64))


def test_demonstrations_cut_short_are_made_again_not_read(tmp_path):
    """A dataset without its generation record (a run killed while writing it, in place as
    before) is made again whole; the new one is written beside and renamed, leaving nothing."""
    root = tmp_path / "demos"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text('{"codebase_version": "v2.1", "total_episodes": 1')  # cut short
    env = environment.make("metaworld", TASK, image_size=None, max_steps=150)
    stored = demonstrations.generate(env, str(root), 1, seed=0, description=describe(None))
    env.close()
    assert stored["request"]["count"] == 1
    read = demonstrations.read(str(root), env_state_key=ENV_STATE)
    assert len(read) == 1 and len(read[0].action) > 10
    assert sorted(os.listdir(tmp_path)) == ["demos"]  # no partial directory left beside it
    (root / "notes.txt").write_text("mine")
    os.remove(root / demonstrations.GENERATION)
    with pytest.raises(ValueError, match="holds other files than a LeRobot dataset"):
        demonstrations.generate(env, str(root), 1, seed=0, description=describe(None))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[train.TrainedPolicy, str]:
    root = str(tmp_path_factory.mktemp("quick"))
    return state_policy(root, demos=3, steps=30)[0], root


def test_rollouts_are_a_function_of_the_seed(quick):
    quick_policy = quick[0]
    oracle = encoders.StateOracle()
    runs = []
    # A fresh environment each time (nothing carries over), the second rendering: rendering
    # changes nothing, so an encoder that sees no image rolls out unrendered but the pictured runs.
    for image_size in (None, 32):
        env = environment.make("metaworld", TASK, image_size=image_size, max_steps=12)
        runs.append([rollout.rollout(env, oracle, quick_policy, seed) for seed in (1_000_000, 1_000_001)])
        env.close()
    (a0, b0), (a1, b1) = runs
    np.testing.assert_array_equal(a0.actions, a1.actions)
    np.testing.assert_array_equal(b0.actions, b1.actions)
    assert (a0.success, a0.steps) == (a1.success, a1.steps)
    assert not np.allclose(a0.actions, b0.actions)  # another seed, another placement and noise


def test_unknown_task_suite_and_action_size_are_refused(quick):
    quick_policy, root = quick
    with pytest.raises(ValueError, match=r"metaworld task 'button-smash-v3' is unknown; valid: .*button-press-v3"):
        environment.make("metaworld", "button-smash-v3")
    with pytest.raises(ValueError, match=r"suite 'robosuite' is unknown; valid: metaworld"):
        environment.make("robosuite", TASK)
    with pytest.raises(ValueError, match=r"camera 'nose' is not in button-press-v3; valid: .*corner"):
        environment.make("metaworld", TASK, camera="nose")
    # Demonstrations with 3 action numbers against the stored 4-action policy.
    rows = 10
    wrong = TrainingSet.build([np.zeros((rows, 1, 39))], [np.zeros((rows, 4))], [np.zeros((rows, 3))],
                              ["button press"], horizon=8)
    config = policy_config.policy_config("tiny")
    config.total_steps = 30
    with pytest.raises(ValueError, match=r"action dimension is 3 but the policy in .*policy takes 4"):
        train.train(config, wrong, os.path.join(root, "policy"))
    # The same demonstrations, but asked to train otherwise: not silently the old policy.
    config.total_steps = 31
    read = demonstrations.read(os.path.join(root, "demos"), env_state_key=ENV_STATE)
    same = TrainingSet.build([d.env_state[:, None] for d in read], [d.state for d in read], [d.action for d in read],
                             [d.text for d in read], horizon=8)
    with pytest.raises(ValueError, match=r"the policy in .*policy was trained with other total_steps than asked"):
        train.train(config, same, os.path.join(root, "policy"))
    config.total_steps = 30
    assert train.train(config, same, os.path.join(root, "policy"), devices=jax.devices()[:1]).config.total_steps == 30


def test_rendering_without_offscreen_gl_is_named():
    """MuJoCo imported first without MUJOCO_GL picks glfw (a display): say so, not MuJoCo's
    'an OpenGL platform library has not been loaded'."""
    code = ("import mujoco\nfrom caip_jax.policy import metaworld_env\n"
            "metaworld_env.MetaWorldTask('button-press-v3', image_size=None).close()\n"
            "metaworld_env.MetaWorldTask('button-press-v3', image_size=32)")
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "RuntimeError: mujoco was imported before caip_jax.policy.metaworld_env with MUJOCO_GL unset" in done.stderr


@pytest.mark.slow
def test_state_policy_presses_the_button(tmp_path):
    """Measured on button-press-v3 (200-step episodes, 20 seeds): the scripted expert 20/20, a
    uniformly random policy 0/20. A tiny flow policy on the state from 30 demonstrations and 800
    steps reached 18-20/20 over 3 training seeds, so 14/20 is far from both."""
    policy, _ = state_policy(str(tmp_path), demos=30, steps=800)
    env = environment.make("metaworld", TASK, image_size=None, max_steps=150)
    seeds = [demonstrations.HELD_OUT_SEED_OFFSET + j for j in range(20)]
    results = [rollout.rollout(env, encoders.StateOracle(), policy, seed) for seed in seeds]
    env.close()
    assert sum(r.success for r in results) >= 14, [r.success for r in results]
