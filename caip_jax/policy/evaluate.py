"""Judging frozen encoders by control, the paper's way: for each encoder, a policy trained from
the same demonstrations on its cached features, then closed-loop success on held-out seeds of
each simulated task (or, for robot data without a simulator, held-out action error).

Two places: the report goes to `out` (local or object storage, through caip_jax.storage); the
caches, which only this machine reads back, to the local `cache_dir` (default: `out` itself when
it is local, else ~/.cache/caip_jax/policy_eval). Every cache entry is keyed on the exact
identity of what made it (caip_jax.policy.cache), so one cache directory can serve any number
of runs, encoders and checkpoints without ever mixing them:

    cache_dir/demos/<task>-<key>/                     LeRobot dataset of scripted-expert episodes
    cache_dir/features/<encoder>-<key>/<task>.npz     frozen features of every demonstration frame
    cache_dir/policies/<encoder>-<key>/<task>-<key>/  orbax checkpoint of the trained policy
    cache_dir/episodes/<encoder>-<key>/<task>-<key>.json   the rollouts: per held-out seed, success, steps
    cache_dir/encoders/<encoder>-<key>/               a CAIP export brought into JAX
    out/rollouts/<task>/<encoder>-<key>_<i>.gif, .png  the first rollouts, to look at
    out/results.json, results.md, success_rate.png

The report is rewritten after each encoder and task, so a run stopped early (or an encoder
that fails) leaves the results so far, naming what is missing; run again, it continues from
the caches (rollouts episode by episode).
"""
import dataclasses
import logging
import os
import time

import ml_collections
import numpy as np
import tqdm

from caip_jax import storage
from caip_jax.policy import cache, demonstrations, encoders, environment, feature_cache, offline, report, train
from caip_jax.policy.dataset import TrainingSet
from caip_jax.policy.rollout import Timer, rollout

BASELINES = ("state", "blind")  # beside every simulated table: the ceiling and the floor


@dataclasses.dataclass
class Simulated:
    """What a simulated evaluation runs: `demos` demonstrations and `episodes` held-out rollouts
    of each task; one policy per task, or one over all tasks told apart by the instruction."""

    suite: str
    tasks: list[str] | None = None  # default: the suite's discriminating default suite
    demos: int = 50
    episodes: int = 50
    seed: int = 0
    image_size: int = 128
    camera: str | None = None
    max_steps: int | None = None  # of a rollout (default: the suite's)
    multitask: bool = False
    strips: int = 2  # rollouts per task and encoder saved as GIF and PNG strip
    cache_dir: str | None = None  # default: `out` if local, else DEFAULT_CACHE
    baselines: bool = True  # add `state` and `blind` when not given


DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "caip_jax", "policy_eval")


def cache_directory(out: str, cache_dir: str | None) -> str:
    """Where the caches go: `cache_dir`, else `out` when it is local, else DEFAULT_CACHE (never
    a local folder named after a URL)."""
    if cache_dir:
        if storage.is_remote(cache_dir):
            raise ValueError(f"--cache_dir={cache_dir} must be a local directory (the caches are read back often)")
        return cache_dir
    return DEFAULT_CACHE if storage.is_remote(out) else out


def reference_config(specs: list[str], caip_config: ml_collections.ConfigDict | None):
    """The CAIP config of the `random` and `siglip2:` baselines: `caip_config`, else the first
    CAIP workdir's or export's."""
    if caip_config is not None:
        return caip_config
    path = next((s for s in specs if encoders.is_caip_path(s)), None)
    return None if path is None else encoders.caip_config(path)


def with_baselines(specs: list[str], baselines: tuple[str, ...]) -> list[str]:
    """`baselines` first (in their order), then the other `specs` in order, each spec once."""
    return list(dict.fromkeys(list(baselines) + list(specs)))


@dataclasses.dataclass
class Entry:
    """An encoder of the run: its spec, exact identity, table name and cache directory name."""

    spec: str
    identity: dict
    name: str
    directory: str


def identify(specs: list[str], kind: str, reference, seed: int) -> list[Entry]:
    """Each spec's identity, its distinct table name and its cache directory name."""
    identities = [encoders.identity(s, kind, reference, seed) for s in specs]
    names = cache.distinct_names([encoders.display_name(s) for s in specs], [encoders.spec_path(s) for s in specs])
    return [Entry(s, i, n, cache.directory_name(n, i)) for s, i, n in zip(specs, identities, names)]


def _loaded(entries: list[Entry], kind: str, reference, cache_dir: str, seed: int):
    """Yields (entry, encoder) in turn (one encoder in memory at a time)."""
    for entry in entries:
        encoder = encoders.load(entry.spec, kind, reference, cache=os.path.join(cache_dir, "encoders", entry.directory),
                                seed=seed, step=entry.identity.get("step"))
        encoder.name = entry.name
        yield entry, encoder


class Stages:
    """Wall and CPU seconds of each stage of the run (demonstrations, features, training,
    rollouts), per task and encoder, for results.json and benchmarks/policy.py."""

    def __init__(self):
        self.records = []

    def __call__(self, stage: str, task: str | None = None, encoder: str | None = None, **extra):
        records = self.records

        class Span:
            def __enter__(self):
                self.start = time.perf_counter(), time.process_time()
                return self

            def __exit__(self, kind, *_):
                if kind is None:
                    records.append(dict(stage=stage, task=task, encoder=encoder,
                                        wall_s=time.perf_counter() - self.start[0],
                                        cpu_s=time.process_time() - self.start[1], **extra))

        return Span()


def _demonstrations(run: Simulated, cache_dir: str, stages: Stages) -> tuple[dict, dict]:
    """Generates (once) and reads the demonstrations of every task, one environment at a time:
    ({task: demonstrations}, {task: their identity}). They are always rendered, so that one set
    serves every encoder, the state included; the expert gets the suite's default step budget
    (`max_steps` bounds the rollouts)."""
    demos, identities = {}, {}
    for task in run.tasks:
        with stages("demonstrations", task):
            env = environment.make(run.suite, task, run.image_size, run.camera)
            try:
                description = dict(suite=run.suite, task=task, camera=getattr(env, "camera", run.camera),
                                   image_size=run.image_size, max_steps=env.max_steps)
                identities[task] = demonstrations.request(env, run.demos, run.seed, description)
                root = os.path.join(cache_dir, "demos", cache.directory_name(task, identities[task]))
                stored = demonstrations.generate(env, root, run.demos, run.seed, description)
                demos[task] = demonstrations.read(root, video_key=stored["camera_key"],
                                                  env_state_key="observation.environment_state")
                action_dim = demos[task][0].action.shape[1]
                if action_dim != env.action_dim:
                    raise ValueError(f"the demonstrations in {root} have action dimension {action_dim} but "
                                     f"{run.suite} {task} takes {env.action_dim}: remove that directory")
            finally:
                env.close()
    return demos, identities


def _training_set(features, demos, horizon: int, instructions=None) -> TrainingSet:
    return TrainingSet.build(features, [d.state for d in demos], [d.action for d in demos], [d.text for d in demos],
                             horizon, instructions)


def _features(entry: Entry, encoder, demos: list, data_identity, cache_dir: str, name: str) -> list[np.ndarray]:
    identity = dict(encoder=entry.identity, data=data_identity, episodes=[d.key for d in demos])
    path = os.path.join(cache_dir, "features", entry.directory, f"{cache.slug(name)}.npz")
    return feature_cache.cached_features(encoder, demos, path, identity)


def _policy(config: ml_collections.ConfigDict, data: TrainingSet, entry: Entry, cache_dir: str, name: str):
    """The policy trained on `data`, from the cache if one was trained on exactly that data
    with exactly that config (its directory is named by both)."""
    fitted = train.fitted_config(config, data).to_dict()
    directory = os.path.join(cache_dir, "policies", entry.directory, cache.directory_name(name, fitted))
    return train.train(config, data, directory), cache.key(fitted)


def evaluate_simulated(specs: list[str], config: ml_collections.ConfigDict, run: Simulated, out: str,
                       caip_config: ml_collections.ConfigDict | None = None) -> dict:
    """Success of a policy on each encoder's features, per task; writes the report to `out`
    (after each encoder and task: a run cut short leaves the results so far)."""
    run = dataclasses.replace(run, tasks=list(run.tasks or environment.default_tasks(run.suite)))
    specs = with_baselines(specs, BASELINES if run.baselines else ())
    for spec in specs:
        encoders.check_spec(spec)
    for task in run.tasks:  # an unknown task fails before anything is generated
        if task not in environment.tasks(run.suite):
            raise ValueError(f"{run.suite} task {task!r} is unknown; valid: {', '.join(environment.tasks(run.suite))}")
    cache_dir = cache_directory(out, run.cache_dir)
    reference = reference_config(specs, caip_config)
    entries = identify(specs, config.features, reference, run.seed)
    stages = Stages()
    demos, demo_identities = _demonstrations(run, cache_dir, stages)
    controls = {t: why for t, why in environment.controls(run.suite).items() if t in run.tasks}
    results = dict(suite=run.suite, tasks=run.tasks, controls=controls, encoders=[e.name for e in entries],
                   encoder_specs={e.name: e.spec for e in entries}, encoder_directories={e.name: e.directory for e in entries},
                   demos=run.demos, episodes_asked=run.episodes, seed=run.seed, multitask=run.multitask,
                   features=config.features, policy=config.to_dict(), cache_dir=os.path.abspath(cache_dir),
                   successes={t: {} for t in run.tasks}, episodes={t: {} for t in run.tasks},
                   mean_steps={t: {} for t in run.tasks}, timings=stages.records)

    def publish():
        missing = [f"{e.name} on {t}" for e in entries for t in run.tasks if e.name not in results["successes"][t]]
        results.update(report.simulated_statistics(results["successes"], results["episodes"], results["encoders"],
                                                   run.tasks, controls), missing=missing)
        report.write_simulated(results, out)

    publish()
    for entry, encoder in _loaded(entries, config.features, reference, cache_dir, run.seed):
        features = {}
        for t in run.tasks:
            with stages("features", t, entry.name):
                features[t] = _features(entry, encoder, demos[t], demo_identities[t], cache_dir, t)
        if run.multitask:
            with stages("train", None, entry.name):
                joined = _training_set(sum((features[t] for t in run.tasks), []), sum((demos[t] for t in run.tasks), []),
                                       config.horizon)
                shared = _policy(config, joined, entry, cache_dir, "multitask")
        for task in run.tasks:
            if run.multitask:
                policy, policy_key = shared
            else:
                with stages("train", task, entry.name):
                    policy, policy_key = _policy(config, _training_set(features[task], demos[task], config.horizon),
                                                 entry, cache_dir, task)
            episodes = _rollouts(entry, encoder, policy, policy_key, run, task, cache_dir, out, stages)
            results["successes"][task][entry.name] = int(sum(r["success"] for r in episodes))
            results["episodes"][task][entry.name] = len(episodes)
            results["mean_steps"][task][entry.name] = float(np.mean([r["steps"] for r in episodes]))
            logging.info("%s on %s: %d/%d", entry.name, task, results["successes"][task][entry.name], len(episodes))
            publish()
    return results


def _rollouts(entry: Entry, encoder, policy, policy_key: str, run: Simulated, task: str, cache_dir: str, out: str,
              stages: Stages) -> list[dict]:
    """`run.episodes` rollouts on held-out seeds, each {seed, success, steps}: read from the
    rollout cache when this very policy, encoder and environment ran that seed before, else
    run (and the cache rewritten after each episode). The first `run.strips` are saved to
    `out` as GIF and PNG strip (run again for their frames if those files are missing)."""
    seeds = [run.seed + demonstrations.HELD_OUT_SEED_OFFSET + j for j in range(run.episodes)]
    make = lambda image_size: environment.make(run.suite, task, image_size, run.camera, run.max_steps)
    env = make(run.image_size if encoder.needs_images or run.strips else None)
    # An encoder that sees no image renders only the pictured rollouts, the others run in an
    # environment that does not render: rendering is most of a simulated step (Meta-World 10 ms
    # of 11; ManiSkill on lavapipe 60 of 65).
    plain = None
    identity = dict(policy=policy_key, encoder=entry.identity, suite=run.suite, task=task, image_size=run.image_size,
                    camera=getattr(env, "camera", run.camera), max_steps=env.max_steps)
    path = os.path.join(cache_dir, "episodes", entry.directory, f"{cache.directory_name(task, identity)}.json")
    done = (cache.read_json(path, identity) or {}).get("episodes", {})
    pictures = storage.join(out, "rollouts", task, entry.directory)
    timer = Timer()
    try:
        if policy.config.dims.action != env.action_dim:
            raise ValueError(f"the policy takes action dimension {policy.config.dims.action} but {run.suite} {task} "
                             f"takes {env.action_dim}")
        with stages("rollouts", task, entry.name, episodes=run.episodes):
            for j, seed in enumerate(tqdm.tqdm(seeds, unit="episode", desc=f"rollouts ({entry.name}, {task})")):
                strip = j < run.strips
                if str(seed) in done and not (strip and not storage.exists(f"{pictures}_{j}.gif")):
                    continue
                acting = env
                if not (strip or encoder.needs_images) and run.strips:
                    plain = acting = plain or make(None)
                result = rollout(acting, encoder, policy, seed, record_frames=strip, timer=timer)
                if result.frames is not None:
                    report.save_gif(result.frames, f"{pictures}_{j}.gif", fps=20)
                    report.save_strip(result.frames, f"{pictures}_{j}.png")
                done[str(seed)] = dict(success=bool(result.success), steps=int(result.steps))
                cache.write_json(path, identity, dict(episodes=done))
        stages.records[-1].update(split_wall_s=dict(timer.wall), split_cpu_s=dict(timer.cpu))  # this span's
        return [dict(seed=s, **done[str(s)]) for s in seeds]
    finally:
        for opened in (env, plain):
            if opened is not None:
                opened.close()


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
    cache_dir: str | None = None
    baselines: bool = True  # add `blind` (proprioception alone) when not given


def _dataset_identity(root: str, run: Offline) -> dict:
    """A local LeRobot dataset's identity: its absolute path, the contents of its files and the
    columns read."""
    return dict(path=os.path.abspath(root), sha256=cache.tree_digest(root), video_key=run.video_key,
                state_key=run.state_key, action_key=run.action_key)


def evaluate_offline(specs: list[str], config: ml_collections.ConfigDict, run: Offline, out: str,
                     caip_config: ml_collections.ConfigDict | None = None) -> dict:
    """Held-out action error of a policy on each encoder's features, per dataset."""
    if "state" in specs:
        raise ValueError("encoder 'state' needs a simulator's state; robot datasets have none: leave it out")
    specs = with_baselines(specs, ("blind",) if run.baselines else ())
    for spec in specs:
        encoders.check_spec(spec)
    cache_dir = cache_directory(out, run.cache_dir)
    reference = reference_config(specs, caip_config)
    entries = identify(specs, config.features, reference, run.seed)
    demos = {root: demonstrations.read(root, run.video_key, run.state_key, run.action_key) for root in run.datasets}
    identities = {root: _dataset_identity(root, run) for root in run.datasets}
    labels = cache.distinct_names([os.path.basename(os.path.normpath(r)) for r in run.datasets], list(run.datasets))
    names = dict(zip(run.datasets, labels))
    mse, by_step = {n: {} for n in names.values()}, {n: {} for n in names.values()}
    for entry, encoder in _loaded(entries, config.features, reference, cache_dir, run.seed):
        for root, name in names.items():
            dataset_dir = cache.directory_name(name, identities[root])
            features = _features(entry, encoder, demos[root], identities[root], cache_dir, dataset_dir)
            rows = _training_set(features, demos[root], config.horizon)
            fit, test = offline.split_episodes(len(demos[root]), run.held_out)
            policy, _ = _policy(config, rows.episodes(fit), entry, cache_dir, dataset_dir)
            scored = offline.action_error(policy, rows.episodes(test), run.seed)
            mse[name][entry.name], by_step[name][entry.name] = scored["mse"], scored["mse_by_step"]
    results = dict(mse=mse, mse_by_step=by_step, encoders=[e.name for e in entries], datasets=list(names.values()),
                   dataset_paths={n: os.path.abspath(r) for r, n in names.items()}, held_out=run.held_out,
                   features=config.features, policy=config.to_dict(), cache_dir=os.path.abspath(cache_dir))
    report.write_offline(results, out)
    return results
