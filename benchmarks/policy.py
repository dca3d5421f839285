"""What judging an encoder by control costs, measured in one run:

  python benchmarks/policy.py [--caip WORKDIR_OR_EXPORT] [--task button-press-v3] [--steps 400]

- Meta-World simulation and rendering: frames per second of wall time and per CPU-second of
  this process (what one core delivers), with the scripted expert acting: simulation alone,
  with the fast rendering of caip_jax.policy.metaworld_env (no shadows, reflections or
  multisampling; 128 px), and with MuJoCo's default visual quality for comparison.
- Policy training steps/s of the tiny decoder (configs/policy_tiny.py, batch 64, one device) on
  cached pooled features: the difference between two runs of different length, so that
  compilation and checkpointing cancel out.
- Feature caching: a training step that had to recompute its batch's frozen features would
  also run the encoder on 64 frames (preprocessing included); the speed-up is that
  (encoder + step) over the cached step, with the CAIP of --caip (default: configs/demo.py at
  random init with a tokenizer trained here).
Writes benchmarks/results/policy.json.
"""
import importlib.util
import os
import tempfile
import time

from absl import app, flags

import results_io

flags.DEFINE_string("caip", None, "A CAIP workdir or export for the feature-caching figure.")
flags.DEFINE_string("task", "button-press-v3", "The Meta-World task.")
flags.DEFINE_integer("steps", 400, "Environment steps per rendering figure.")
flags.DEFINE_integer("train_steps", 500, "Extra training steps of the longer of the two training runs.")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frames_per_second(env, steps: int, render=None) -> dict:
    """The expert acting for `steps` steps (resetting after a success); `render` is called
    after each step when given."""
    wall, cpu = time.perf_counter(), time.process_time()
    env.reset(0)
    for k in range(steps):
        _, success = env.step(env.expert_action())
        if render is not None:
            render()
        if success:
            env.reset(k + 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(frames_per_second=steps / wall, frames_per_cpu_second=steps / cpu, ms_per_frame=1e3 * wall / steps)


def rendering(task: str, steps: int) -> dict:
    from caip_jax.policy import metaworld_env  # first: it picks MuJoCo's offscreen OpenGL

    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    out = {}
    env = metaworld_env.MetaWorldTask(task, image_size=None)
    out["simulation_only"] = frames_per_second(env, steps)
    env.close()
    env = metaworld_env.MetaWorldTask(task, image_size=128)
    out["fast_rendering_128px"] = frames_per_second(env, steps)
    env.close()
    # MuJoCo's default quality (the scene's 4096^2 shadow map, 4x multisampling): fewer steps.
    env = metaworld_env.MetaWorldTask(task, image_size=None)
    raw = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]()
    renderer = mujoco.Renderer(raw.model, 128, 128)

    def render():
        raw.data.qpos[:], raw.data.qvel[:] = env._env.data.qpos, env._env.data.qvel
        mujoco.mj_forward(raw.model, raw.data)
        renderer.update_scene(raw.data, camera=metaworld_env.DEFAULT_CAMERA)
        renderer.render()

    out["default_quality_128px"] = frames_per_second(env, max(steps // 10, 10), render)
    renderer.close()
    env.close()
    out["rendering_speedup"] = out["fast_rendering_128px"]["frames_per_second"] / out["default_quality_128px"]["frames_per_second"]
    return out


def caip_encoder(path: str | None, work: str):
    from caip_jax.data import tokenizer
    from caip_jax.policy import encoders

    if path:
        return encoders.load(path, "pooled", None, cache=os.path.join(work, "encoder"))
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.tokenizer = tokenizer.train_sentencepiece(["button press", "drawer open"] * 50,
                                                          os.path.join(work, "spm"), 300)
    return encoders.caip_initialised(config, "pooled")


def training_and_caching(caip: str | None, extra_steps: int) -> dict:
    import jax
    import numpy as np

    from caip_jax.policy import config as policy_config
    from caip_jax.policy import train
    from caip_jax.policy.dataset import TrainingSet

    work = tempfile.mkdtemp(prefix="policy_bench_")
    encoder = caip_encoder(caip, work)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)
    texts = ["button press"] * 64
    encoder.encode(frames, texts, None)  # compile
    start = time.perf_counter()
    for _ in range(5):
        features = encoder.encode(frames, texts, None)
    encode_seconds = (time.perf_counter() - start) / 5
    episodes = 20
    data = TrainingSet.build([np.repeat(features, 5, axis=0)[:100] for _ in range(episodes)],
                             [rng.standard_normal((100, 4)) for _ in range(episodes)],
                             [rng.uniform(-1, 1, (100, 4)) for _ in range(episodes)], texts[:episodes], horizon=8)
    config = policy_config.policy_config("tiny")
    seconds = {}
    for steps in (50, 50 + extra_steps):
        config.total_steps = steps
        start = time.perf_counter()
        train.train(config, data, os.path.join(work, f"policy_{steps}"), devices=jax.devices()[:1])
        seconds[steps] = time.perf_counter() - start
    step_seconds = (seconds[50 + extra_steps] - seconds[50]) / extra_steps
    return dict(
        encoder=encoder.name, feature_shape=list(features.shape[1:]), batch=config.batch_size,
        policy_parameters=train.num_params(train.load(os.path.join(work, "policy_50"), jax.devices()[:1]).config),
        train_steps_per_second=1 / step_seconds,
        encoder_ms_per_batch_of_64=1e3 * encode_seconds,
        recomputing_steps_per_second=1 / (step_seconds + encode_seconds),
        caching_speedup=(step_seconds + encode_seconds) / step_seconds,
    )


def main(argv):
    del argv
    result = dict(machine=results_io.machine(), task=FLAGS.task)
    result["rendering"] = rendering(FLAGS.task, FLAGS.steps)
    result["training"] = training_and_caching(FLAGS.caip, FLAGS.train_steps)
    result["machine_after"] = results_io.machine()
    results_io.write("policy", result)


if __name__ == "__main__":
    app.run(main)
