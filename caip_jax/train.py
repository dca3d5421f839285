"""The training loop: restore (or init, random or SigLIP 2), then per step the jitted sharded
step, a log line, a checkpoint, and preemption. Every process of a multi-host run runs `train`
with the same config.
"""
import logging
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from caip_jax import flops, run_state, sharding, storage, train_step, xla_cache
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline
from caip_jax.data.tokenizer import Tokenizer
from caip_jax.metrics import MetricsLog, peak_flops_per_device

# The exit status of a run stopped by SIGTERM after saving: EX_TEMPFAIL, "try again later", so a
# scheduler can tell preemption (restart it) from completion (0) and failure (1).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Raised by `train` after it saved `step` on SIGTERM; tools exit with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}; run the same command again to resume")
        self.step = step


class NonFiniteError(RuntimeError):
    """The loss, gradient norm or parameters stopped being finite (config.nonfinite)."""


class Preemption:
    """SIGTERM (how pods announce preemption) -> the step at which every process saves and exits.

    With several processes this is JAX's preemption sync point: the coordination service hears
    SIGTERM on any process and names one step for all, with no device work, so the host keeps
    dispatching steps ahead of the devices. One process keeps its own SIGTERM flag.
    """

    def __init__(self):
        self._multiprocess = jax.process_count() > 1
        self._received = False
        if not self._multiprocess:  # with several, JAX's own handler must stay in place
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")
        self._received = True

    def reached(self, step: int) -> bool:
        """Called once at every step by every process; True at the step to save and stop at."""
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._received

    def restore(self):
        if not self._multiprocess:
            signal.signal(signal.SIGTERM, self._previous)


class FiniteCheck:
    """Watches the loss and gradient norm of every step without waiting for them: their device
    arrays are kept and read at the next log or save, where the host waits anyway.

    config.nonfinite.policy "stop": a non-finite step stops the run with an error naming it,
    before any checkpoint of what followed is written. "skip": the optimizer skipped that update
    (optax.apply_if_finite, see run_state.optimizer); skipped updates are counted, and more than
    `max_consecutive` in a row stop the run.
    """

    def __init__(self, config: ml_collections.ConfigDict, skipped: int):
        self.policy, self.max_consecutive = config.nonfinite.policy, config.nonfinite.max_consecutive
        self.skipped, self._consecutive, self._pending = skipped, 0, []
        self._params_finite = jax.jit(lambda p: jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

    def check(self, params=None) -> None:
        """Reads the pending steps (and with `params`, checks them too: before a save)."""
        pending, self._pending = jax.device_get(self._pending), []
        for step, value, norm in pending:
            if np.isfinite(value) and np.isfinite(norm):
                self._consecutive = 0
                continue
            if self.policy == "stop":
                raise NonFiniteError(
                    f"step {step}: loss {value}, gradient norm {norm}; stopped before saving it (the latest "
                    "checkpoint is finite). Lower optim.learning_rate or set config.nonfinite.policy='skip'"
                )
            self.skipped += 1
            self._consecutive += 1
            logging.warning("step %d: loss %s, gradient norm %s: update skipped (%d so far)", step, value, norm, self.skipped)
            if self._consecutive > self.max_consecutive:
                raise NonFiniteError(
                    f"step {step}: {self._consecutive} non-finite steps in a row (config.nonfinite.max_consecutive="
                    f"{self.max_consecutive}); the latest checkpoint is finite. Lower optim.learning_rate"
                )
        if params is not None and not bool(self._params_finite(params)):
            raise NonFiniteError(
                f"step {pending[-1][0]}: parameters are not finite although loss and gradient were; not saved "
                "(the latest checkpoint is finite). Lower optim.learning_rate"
            )


def global_batch(local: dict, batch_sharding) -> dict:
    """This process's rows -> global arrays over the mesh."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in train_step.BATCH_KEYS}


def training_batches(config: ml_collections.ConfigDict) -> tuple[list[pipeline.Source], Any, np.ndarray, np.ndarray, dict]:
    """The sources of `data.train`, this process's training batches, the action mean and std
    [S, 2, 21, 9] per source (see `run_state.action_stats`), and what each record set lacks
    (shards left out under `data.missing_shards="skip"`)."""
    sources, mean, std = run_state.action_stats(config)
    model, data = config.model, config.data
    preprocess = pipeline.Preprocess(data.tokenizer, model.image_size, model.text.length, model.action.horizon)
    sets = [pipeline.open_record_set(s.path, data.missing_shards) for s in sources]
    if jax.process_count() > 1:  # a shard unreadable on one host only would split the data
        multihost_utils.assert_equal(np.array([sum(r.counts) for r in sets]), "data.train: processes see different records")
    lost = {s.name: r.loss() for s, r in zip(sources, sets) if r.missing_shards}
    for name, loss in lost.items():
        logging.warning("data.train %r trains without %s (%s records)", name, loss["missing_shards"], loss["records_lost"])
    mixture = [(r, preprocess, s.weight) for r, s in zip(sets, sources)]
    batches = pipeline.train_batches(mixture, config.batch_size, config.seed, jax.process_index(), jax.process_count())
    return sources, batches, mean, std, lost


def all_processes_sum(counts: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return counts
    return multihost_utils.process_allgather(counts).sum(axis=0)


def check_data(config: ml_collections.ConfigDict) -> None:
    """Refuses data that cannot fit the model before any step runs: token ids beyond the
    embedding table would read garbage (NaN on some backends), not fail."""
    if not config.data.tokenizer:
        raise ValueError(
            "data.tokenizer is not set: give SigLIP 2's tokenizer (a Hugging Face directory or its "
            "sentencepiece .model), e.g. --config.data.tokenizer=/ckpt/siglip2-large-patch16-256"
        )
    vocab = Tokenizer(config.data.tokenizer, config.model.text.length).vocab_size
    if vocab > config.model.text.vocab_size:
        raise ValueError(
            f"data.tokenizer={config.data.tokenizer!r} has {vocab} ids but model.text.vocab_size="
            f"{config.model.text.vocab_size}: set model.text.vocab_size to at least {vocab}"
        )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, "config.json"), config.to_dict())


def import_siglip2(config: ml_collections.ConfigDict, path: str, workdir: str) -> int:
    """Writes step 0 of `workdir` (params and config, marked as imported) with SigLIP 2's towers
    from `path`; `train` continues from it. Refuses a workdir that already has checkpoints."""
    checkpoints = Checkpoints(workdir)
    params = run_state.initial_params(run_state.setup(config), config.seed, path, config.init.siglip2_logit_scalars)
    checkpoints.save_import(params, config, path)
    checkpoints.close()
    save_config(config, workdir)
    return 0


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains to `config.total_steps`, resuming from the latest whole checkpoint in `workdir` if
    there is one. Returns the last logged metrics; raises Preempted after saving on SIGTERM."""
    check_data(config)
    save_config(config, workdir)
    xla_cache.use(config.compilation_cache.format(workdir=workdir))
    run = run_state.setup(config)
    opt = run_state.optimizer(config, run)

    sources, batches, mean, std, lost = training_batches(config)
    iterator = pipeline.iterate(batches, workers=config.data.workers)

    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep)
    start, params, opt_state, progress, mean, std = restore(config, run, opt, checkpoints, iterator, sources, mean, std)
    action_stats = run_state.stats_to_json(config, sources, mean, std)
    if progress and progress.get("missing_shards", {}) != lost:
        logging.warning("data.train lacks %s now, %s at the checkpoint: the batches differ from here on", lost, progress.get("missing_shards"))
    counts = Counts(sources, progress)
    finite = FiniteCheck(config, progress.get("skipped_updates", 0))

    batch_sharding = sharding.batch_sharding(run.mesh)
    local = next(iterator)
    batch = global_batch(local, batch_sharding)
    compiled = compile_step(config, run, opt, mean, std, params, opt_state, batch)

    log = MetricsLog(workdir, total_steps=config.total_steps, start=start)
    preemption = Preemption()
    timer = StepTimer(config, run, compiled)
    last, preempted = {}, None
    try:
        for step in range(start + 1, config.total_steps + 1):
            params, opt_state, metrics = compiled(params, opt_state, batch)
            counts.add(local)
            finite.add(step, metrics)
            timer.steps += 1
            final, stop = step == config.total_steps, preemption.reached(step)
            save = step % config.checkpoint.every_steps == 0 or final or stop
            logged = step % config.log.every_steps == 0 or final or step == start + 1
            if logged or save:  # the host waits for the device here anyway
                finite.check(params if save else None)
            if logged:
                last = log_step(log, step, metrics, opt, timer, counts, finite)
            log.advance()
            if save:
                progress = dict(counts.totals(), skipped_updates=finite.skipped, missing_shards=lost)
                checkpoints.save(step, params, opt_state, iterator, config, progress, action_stats)
                if stop and not final:
                    logging.warning("saved step %d after SIGTERM; exiting", step)
                    preempted = step
                    break
            if not final:
                local = next(iterator)
                batch = global_batch(local, batch_sharding)
    finally:
        preemption.restore()
        checkpoints.close()
        log.close()
        iterator.close()
    if preempted is not None:
        raise Preempted(preempted)
    return last


def restore(config, run, opt, checkpoints: Checkpoints, iterator, sources, mean, std) -> tuple:
    """The run's start: (step, params, opt_state, progress, mean, std) of the newest intact
    checkpoint (the iterator restored with it, the action statistics the checkpoint's), or
    step 0 of an import, or fresh parameters (random or SigLIP 2)."""
    restored = checkpoints.restore_run(run_state.abstract_params(run), opt.abstract_state, iterator, config.data.workers)
    if restored is None:
        params = run_state.initial_params(run, config.seed, config.init.siglip2, config.init.siglip2_logit_scalars)
        return 0, params, opt.init(params), {}, mean, std
    step, items = restored
    if "opt_state" not in items:  # written by an import: its parameters start the run
        logging.info("starting from the parameters imported from %s", items["progress"]["imported_from"])
        return 0, items["params"], opt.init(items["params"]), {}, mean, std
    logging.info("resuming from step %d in %s", step, checkpoints.directory)
    mean, std = run_state.stats_from_checkpoint(items["action_stats"], config, sources, mean, std)
    return step, items["params"], items["opt_state"], items["progress"], mean, std


def compile_step(config, run, opt, mean, std, params, opt_state, batch):
    """The jitted step, compiled for these arguments (or loaded from the compilation cache)."""
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return train_step.jit_train_step(run, opt, config, mean, std).lower(params, opt_state, batch).compile()


class Counts:
    """Samples seen and records that failed to read, per source: the checkpoint's totals plus
    this process's rows since the start or resume (summed over processes when read)."""

    def __init__(self, sources: list[pipeline.Source], progress: dict):
        self.names = [s.name for s in sources]
        stored = lambda key: np.array([progress.get(key, {}).get(n, 0) for n in self.names], np.int64)
        self.stored = dict(samples_seen=stored("samples_seen"), records_skipped=stored("records_skipped"))
        self.local = {key: np.zeros(len(self.names), np.int64) for key in self.stored}

    def add(self, local: dict) -> None:
        index, n = local["source_index"], len(self.names)
        self.local["samples_seen"] += np.bincount(index, minlength=n)
        self.local["records_skipped"] += np.bincount(index, local["skipped"], minlength=n).astype(np.int64)

    def totals(self) -> dict[str, dict[str, int]]:
        """{samples_seen, records_skipped: {source: count}} over all processes (a collective)."""
        return {key: dict(zip(self.names, map(int, self.stored[key] + all_processes_sum(self.local[key])))) for key in self.stored}


class StepTimer:
    """Seconds per step since the last log, and the FLOPs that make MFU of them."""

    def __init__(self, config: ml_collections.ConfigDict, run: run_state.Setup, compiled):
        self.batch_size, self.start, self.steps = config.batch_size, time.perf_counter(), 0
        self.compiled_flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
        # MFU counts the model's FLOPs, not what XLA compiled: that includes rematerialisation,
        # accumulation's second forward, and counts the ring loss's scan body once.
        self.model_flops = flops.train_flops_per_sample(config.model, config.batch_size) * config.batch_size / run.mesh.size
        self.peak = peak_flops_per_device(jax.devices()[0])

    def lap(self) -> dict:
        elapsed = (time.perf_counter() - self.start) / self.steps
        self.start, self.steps = time.perf_counter(), 0
        return dict(
            step_time=elapsed,
            samples_per_second=self.batch_size / elapsed,
            flops_per_device=self.model_flops,
            compiled_flops_per_device=self.compiled_flops,
            mfu=self.model_flops / elapsed / self.peak if self.peak else None,
        )


def log_step(log: MetricsLog, step: int, metrics: dict, opt, timer: StepTimer, counts: Counts, finite: FiniteCheck) -> dict:
    """Writes step `step`'s line (console, TensorBoard, metrics.jsonl) and returns it."""
    totals = counts.totals()
    line = dict(
        {k: float(v) for k, v in jax.device_get(metrics).items()},
        step=step,
        learning_rate=float(opt.schedule(step - 1)),
        chance_top1=1.0 / timer.batch_size,
        **timer.lap(),
        skipped_updates=finite.skipped,
        **{f"seen_{name}": n for name, n in totals["samples_seen"].items()},
        **{f"records_skipped_{name}": n for name, n in totals["records_skipped"].items()},
    )
    log.write(line)
    return line
