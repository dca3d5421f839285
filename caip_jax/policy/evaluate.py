"""Judging frozen encoders by control, the paper's way: for each encoder, a policy trained from
the same demonstrations on its cached features, then closed-loop success on held-out seeds of
each simulated task (or, for robot data without a simulator, held-out action error).

Layout under `out`:
    demos/<task>/                 LeRobot dataset of scripted-expert episodes (made once)
    features/<encoder>/<task>.npz cached frozen features of every demonstration frame
    policies/<encoder>/<task>/    orbax checkpoint of the trained policy (or .../multitask/)
    encoders/<encoder>/           what an encoder keeps (a CAIP export brought into JAX)
    rollouts/<task>/<encoder>_<i>.gif, .png   the first rollouts, to look at
    results.json, results.md, success_rate.png
"""
import dataclasses
import logging
import os
import re

import ml_collections
import numpy as np
import tqdm

from caip_jax.policy import demonstrations, encoders, environment, feature_cache, offline, report, train
from caip_jax.policy.dataset import TrainingSet
from caip_jax.policy.rollout import rollout


@dataclasses.dataclass
class Simulated:
    """What a simulated evaluation runs: `demos` demonstrations and `episodes` held-out rollouts
    of each task; one policy per task, or one over all tasks told apart by the instruction."""

    suite: str
    tasks: list[str]
    demos: int
    episodes: int
    seed: int = 0
    image_size: int = 128
    camera: str | None = None
    max_steps: int | None = None  # of a rollout (default: the suite's)
    multitask: bool = False
    strips: int = 2  # rollouts per task and encoder saved as GIF and PNG strip


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def reference_config(specs: list[str], caip_config: ml_collections.ConfigDict | None):
    """The CAIP config of the `random` and `siglip2:` baselines: `caip_config`, else the first
    CAIP workdir's or export's."""
    if caip_config is not None:
        return caip_config
    path = next((s for s in specs if encoders.is_caip_path(s)), None)
    return None if path is None else encoders.caip_config(path)


def _loaded(specs: list[str], kind: str, reference, out: str, seed: int):
    """Yields each encoder in turn (one in memory at a time), with a unique name."""
    names = set()
    for spec in specs:
        encoder = encoders.load(spec, kind, reference, cache=os.path.join(out, "encoders", _slug(spec)), seed=seed)
        while encoder.name in names:
            encoder.name += "+"
        names.add(encoder.name)
        yield encoder


def _demonstrations(run: Simulated, out: str) -> dict[str, list[demonstrations.Demonstration]]:
    """Generates (once) and reads the demonstrations of every task, one environment at a time.
    They are always rendered, so that one set serves every encoder, the state included; the
    expert gets the suite's default step budget (`max_steps` bounds the rollouts)."""
    demos = {}
    for task in run.tasks:
        env = environment.make(run.suite, task, run.image_size, run.camera)
        try:
            root = os.path.join(out, "demos", task)
            description = dict(suite=run.suite, task=task, camera=getattr(env, "camera", run.camera),
                               image_size=run.image_size, max_steps=env.max_steps)
            stored = demonstrations.generate(env, root, run.demos, run.seed, description)
            demos[task] = demonstrations.read(root, video_key=stored["camera_key"],
                                              env_state_key="observation.environment_state")
            action_dim = demos[task][0].action.shape[1]
            if action_dim != env.action_dim:
                raise ValueError(f"the demonstrations in {root} have action dimension {action_dim} but "
                                 f"{run.suite} {task} takes {env.action_dim}: give another --out")
        finally:
            env.close()
    return demos


def _training_set(features, demos, horizon: int, instructions=None) -> TrainingSet:
    return TrainingSet.build(features, [d.state for d in demos], [d.action for d in demos], [d.text for d in demos],
                             horizon, instructions)


def evaluate_simulated(specs: list[str], config: ml_collections.ConfigDict, run: Simulated, out: str,
                       caip_config: ml_collections.ConfigDict | None = None) -> dict:
    """Success rate of a policy on each encoder's features, per task; writes the report to `out`."""
    for spec in specs:
        encoders.check_spec(spec)
    for task in run.tasks:  # an unknown task fails before anything is generated
        if task not in environment.tasks(run.suite):
            raise ValueError(f"{run.suite} task {task!r} is unknown; valid: {', '.join(environment.tasks(run.suite))}")
    reference = reference_config(specs, caip_config)
    demos = _demonstrations(run, out)
    success, episodes, steps, names = {t: {} for t in run.tasks}, {t: {} for t in run.tasks}, {t: {} for t in run.tasks}, []
    for encoder in _loaded(specs, config.features, reference, out, run.seed):
        names.append(encoder.name)
        slug = _slug(encoder.name)
        features = {t: feature_cache.cached_features(encoder, demos[t], os.path.join(out, "features", slug, f"{t}.npz"))
                    for t in run.tasks}
        if run.multitask:
            joined = _training_set(sum((features[t] for t in run.tasks), []), sum((demos[t] for t in run.tasks), []),
                                   config.horizon)
            shared = train.train(config, joined, os.path.join(out, "policies", slug, "multitask"))
        for task in run.tasks:
            policy = shared if run.multitask else train.train(
                config, _training_set(features[task], demos[task], config.horizon),
                os.path.join(out, "policies", slug, task))
            results = _rollouts(encoder, policy, run, task, os.path.join(out, "rollouts", task, slug))
            success[task][encoder.name] = float(np.mean([r.success for r in results]))
            episodes[task][encoder.name] = len(results)
            steps[task][encoder.name] = float(np.mean([r.steps for r in results]))
            logging.info("%s on %s: success %.2f", encoder.name, task, success[task][encoder.name])
    results = dict(success_rate=success, episodes=episodes, mean_steps=steps, encoders=names, tasks=run.tasks,
                   suite=run.suite, demos=run.demos, seed=run.seed, multitask=run.multitask,
                   features=config.features, policy=config.to_dict())
    report.write_simulated(results, out)
    return results


def _rollouts(encoder, policy, run: Simulated, task: str, pictures: str) -> list:
    """`run.episodes` rollouts on held-out seeds; the first `run.strips` are saved as
    `pictures`_j.gif and .png."""
    env = environment.make(run.suite, task, run.image_size if encoder.needs_images or run.strips else None,
                           run.camera, run.max_steps)
    try:
        if policy.config.dims.action != env.action_dim:
            raise ValueError(f"the policy takes action dimension {policy.config.dims.action} but {run.suite} {task} "
                             f"takes {env.action_dim}")
        results = []
        seeds = [run.seed + demonstrations.HELD_OUT_SEED_OFFSET + j for j in range(run.episodes)]
        for j, seed in enumerate(tqdm.tqdm(seeds, unit="episode", desc=f"rollouts ({encoder.name}, {task})")):
            result = rollout(env, encoder, policy, seed, record_frames=j < run.strips)
            if result.frames is not None:
                os.makedirs(os.path.dirname(pictures), exist_ok=True)
                report.save_gif(result.frames, f"{pictures}_{j}.gif", fps=20)
                report.save_strip(result.frames, f"{pictures}_{j}.png")
            results.append(result)
        return results
    finally:
        env.close()


@dataclasses.dataclass
class Offline:
    """Robot datasets (LeRobot) judged by held-out action error; column specs as in
    caip_jax.policy.demonstrations."""

    datasets: list[str]
    video_key: str
    state_key: str = "observation.state"
    action_key: str = "action"
    held_out: float = 0.2
    seed: int = 0


def evaluate_offline(specs: list[str], config: ml_collections.ConfigDict, run: Offline, out: str,
                     caip_config: ml_collections.ConfigDict | None = None) -> dict:
    """Held-out action error of a policy on each encoder's features, per dataset."""
    for spec in specs:
        encoders.check_spec(spec)
    if "state" in specs:
        raise ValueError("encoder 'state' needs a simulator's state; robot datasets have none: leave it out")
    reference = reference_config(specs, caip_config)
    demos = {root: demonstrations.read(root, run.video_key, run.state_key, run.action_key) for root in run.datasets}
    names = {root: _slug(os.path.basename(os.path.normpath(root))) for root in run.datasets}
    mse, by_step, encoder_names = {n: {} for n in names.values()}, {n: {} for n in names.values()}, []
    for encoder in _loaded(specs, config.features, reference, out, run.seed):
        encoder_names.append(encoder.name)
        slug = _slug(encoder.name)
        for root, name in names.items():
            features = feature_cache.cached_features(encoder, demos[root], os.path.join(out, "features", slug, f"{name}.npz"))
            rows = _training_set(features, demos[root], config.horizon)
            fit, test = offline.split_episodes(len(demos[root]), run.held_out)
            policy = train.train(config, rows.episodes(fit), os.path.join(out, "policies", slug, name))
            scored = offline.action_error(policy, rows.episodes(test), run.seed)
            mse[name][encoder.name], by_step[name][encoder.name] = scored["mse"], scored["mse_by_step"]
    results = dict(mse=mse, mse_by_step=by_step, encoders=encoder_names, datasets=list(names.values()),
                   held_out=run.held_out, features=config.features, policy=config.to_dict())
    report.write_offline(results, out)
    return results
