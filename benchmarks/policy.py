"""What judging an encoder by control costs, measured in one run:

  python benchmarks/policy.py [--caip WORKDIR_OR_EXPORT] [--task button-press-v3] [--steps 400] [--parts ...]

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
- The default suite (`--parts suite`): caip-policy-eval's default Meta-World tasks with the
  encoders state, blind and random (the CAIP of --caip, or configs/demo.py at random init), at a
  reduced size (--suite_demos, --suite_episodes, --suite_train_steps), every stage timed in wall
  and CPU seconds (results.json's `timings`, rollouts split into simulate / encode / act), and
  the full suite (50 demonstrations, 50 episodes, 2000 training steps) extrapolated per unit:
  demonstrations and features per demonstration, training per step (an upper bound: compilation
  scaled too), rollouts per episode (an upper bound when the reduced policies fail every
  episode at the step limit, as under-trained ones do).
Writes benchmarks/results/policy.json (or policy_suite.json for --parts suite alone).
"""
import importlib.util
import json
import os
import tempfile
import time

from absl import app, flags

import results_io

flags.DEFINE_string("caip", None, "A CAIP workdir or export for the feature-caching figure.")
flags.DEFINE_string("task", "button-press-v3", "The Meta-World task.")
flags.DEFINE_integer("steps", 400, "Environment steps per rendering figure.")
flags.DEFINE_integer("train_steps", 500, "Extra training steps of the longer of the two training runs.")
flags.DEFINE_list("parts", ["rendering", "training", "suite"], "What to measure (rendering, training, suite; "
                  "marginal: the per-step training cost alone, extrapolating the recorded suite run again).")
flags.DEFINE_list("suite_tasks", None, "The suite's tasks (default: caip-policy-eval's default suite).")
flags.DEFINE_integer("suite_demos", 5, "Demonstrations per task of the reduced suite.")
flags.DEFINE_integer("suite_episodes", 5, "Held-out episodes per task and encoder of the reduced suite.")
flags.DEFINE_integer("suite_train_steps", 200, "Training steps per policy of the reduced suite.")
FULL = dict(demos=50, episodes=50, train_steps=2000)  # caip-policy-eval's defaults
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


def caip_config(path: str | None, work: str):
    """The CAIP config of the `random` encoder: --caip's, else configs/demo.py with a tokenizer
    trained here."""
    from caip_jax.data import tokenizer
    from caip_jax.policy import encoders

    if path:
        return encoders.caip_config(path)
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.tokenizer = tokenizer.train_sentencepiece(
        ["sweep", "handle pull side", "dial turn", "handle pull", "button press"] * 20, os.path.join(work, "spm"), 300)
    return config


def marginal_training(short: int, extra: int) -> dict:
    """CPU and wall seconds per training step of the tiny policy beyond its fixed cost
    (compilation, checkpointing): a warm-up run, then runs of `short` and `short + extra` steps
    on rows shaped like the state encoder's (50 demonstrations of 100 frames)."""
    import jax
    import numpy as np

    from caip_jax.policy import config as policy_config
    from caip_jax.policy import train
    from caip_jax.policy.dataset import TrainingSet

    rng = np.random.default_rng(0)
    data = TrainingSet.build([rng.standard_normal((100, 1, 39)) for _ in range(50)],
                             [rng.standard_normal((100, 4)) for _ in range(50)],
                             [rng.uniform(-1, 1, (100, 4)) for _ in range(50)], ["sweep"] * 50, horizon=8)
    work = tempfile.mkdtemp(prefix="policy_marginal_")
    config = policy_config.policy_config("tiny")
    seconds = {}
    for name, steps in (("warm", short), ("short", short), ("long", short + extra)):
        config.total_steps = steps
        wall, cpu = time.perf_counter(), time.process_time()
        train.train(config, data, os.path.join(work, name), devices=jax.devices()[:1])
        seconds[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return dict(short=short, extra=extra, wall_s_per_step=(seconds["long"][0] - seconds["short"][0]) / extra,
                cpu_s_per_step=(seconds["long"][1] - seconds["short"][1]) / extra,
                fixed_wall_s=seconds["short"][0], fixed_cpu_s=seconds["short"][1])


def recorded_suite() -> dict:
    with open(os.path.join(REPO, "benchmarks", "results", "policy_suite.json")) as f:
        return json.load(f)["suite"]


def extrapolate(suite: dict, marginal: dict) -> dict:
    """The full suite's seconds per stage from the reduced run: demonstrations and features
    scaled by the demonstrations, rollouts by the episodes, training as the reduced run's plus
    the marginal cost of the missing steps for each policy."""
    policies = sum(1 for t in suite["timings"] if t["stage"] == "train")
    scale = dict(demonstrations=FULL["demos"] / suite["demos"], features=FULL["demos"] / suite["demos"],
                 rollouts=FULL["episodes"] / suite["episodes"])
    full = {stage: {k: v[k] * scale[stage] for k in ("cpu_s", "wall_s")} for stage, v in suite["stages"].items()
            if stage in scale}
    missing = policies * (FULL["train_steps"] - suite["train_steps"])
    full["train"] = dict(cpu_s=suite["stages"]["train"]["cpu_s"] + missing * marginal["cpu_s_per_step"],
                         wall_s=suite["stages"]["train"]["wall_s"] + missing * marginal["wall_s_per_step"])
    return dict(FULL, policies=policies, stages=full, cpu_s=sum(v["cpu_s"] for v in full.values()),
                wall_s=sum(v["wall_s"] for v in full.values()))


def default_suite(caip: str | None, tasks, demos: int, episodes: int, train_steps: int) -> dict:
    from caip_jax.policy import config as policy_config
    from caip_jax.policy import evaluate

    work = tempfile.mkdtemp(prefix="policy_suite_")
    config = policy_config.policy_config("tiny")
    config.total_steps = train_steps
    run = evaluate.Simulated("metaworld", tasks, demos=demos, episodes=episodes, strips=0,
                             cache_dir=os.path.join(work, "cache"))
    wall, cpu = time.perf_counter(), time.process_time()
    results = evaluate.evaluate_simulated(["random"], config, run, os.path.join(work, "out"), caip_config(caip, work))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    timings = results["timings"]
    stages = {}
    for t in timings:
        stage = stages.setdefault(t["stage"], dict(wall_s=0.0, cpu_s=0.0))
        stage["wall_s"] += t["wall_s"]
        stage["cpu_s"] += t["cpu_s"]
    split = {}
    for t in timings:
        for part, seconds in t.get("split_cpu_s", {}).items():
            split[part] = split.get(part, 0.0) + seconds
    steps = {t: results["mean_steps"][t] for t in results["tasks"]}
    return dict(
        tasks=results["tasks"], encoders=results["encoders"], demos=demos, episodes=episodes, train_steps=train_steps,
        wall_s=wall, cpu_s=cpu, stages=stages, rollout_split_cpu_s=split, mean_rollout_steps=steps,
        successes=results["successes"], timings=timings,
    )


def main(argv):
    del argv
    result = dict(machine=results_io.machine(), task=FLAGS.task)
    if "rendering" in FLAGS.parts:
        result["rendering"] = rendering(FLAGS.task, FLAGS.steps)
    if "training" in FLAGS.parts:
        result["training"] = training_and_caching(FLAGS.caip, FLAGS.train_steps)
    if "suite" in FLAGS.parts:
        result["suite"] = default_suite(FLAGS.caip, FLAGS.suite_tasks, FLAGS.suite_demos, FLAGS.suite_episodes,
                                        FLAGS.suite_train_steps)
    if "marginal" in FLAGS.parts or "suite" in FLAGS.parts:
        suite = result.get("suite") or recorded_suite()  # --parts marginal: the recorded run
        suite.pop("full_suite", None)  # an older extrapolation
        result["marginal_training"] = marginal_training(FLAGS.suite_train_steps, 300)
        result["suite"] = suite
        result["full_suite"] = extrapolate(suite, result["marginal_training"])
    result["machine_after"] = results_io.machine()
    results_io.write("policy_suite" if set(FLAGS.parts) <= {"suite", "marginal"} else "policy", result)


if __name__ == "__main__":
    app.run(main)
