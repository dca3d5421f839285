"""The training loop: init (random or SigLIP 2) or restore, the jitted sharded step, metrics,
checkpoints and preemption. Every process of a multi-host run runs `train` with the same config.
"""
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from caip_jax import flops, run_state, sharding, train_step
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline, records
from caip_jax.data.tokenizer import Tokenizer
from caip_jax.metrics import MetricsLog, peak_flops_per_device

class Preemption:
    """Turns SIGTERM (how pods announce preemption) into a flag that all processes agree on at
    a step boundary, so that they save the same step and exit."""

    def __init__(self):
        self._received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")
        self._received = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._received
        return bool(multihost_utils.process_allgather(np.int32(self._received)).any())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def global_batch(local: dict, batch_sharding) -> dict:
    """This process's rows -> global arrays over the mesh."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in train_step.BATCH_KEYS}


def training_batches(config: ml_collections.ConfigDict) -> tuple[list[pipeline.Source], Any, np.ndarray, np.ndarray]:
    """The sources of `data.train`, this process's training batches, and the action mean and
    std [S, 2, 21, 9] per source (see `run_state.action_stats`)."""
    sources, mean, std = run_state.action_stats(config)
    model, data = config.model, config.data
    preprocess = pipeline.Preprocess(data.tokenizer, model.image_size, model.text.length, model.action.horizon)
    mixture = [(s.path, preprocess, s.weight) for s in sources]
    batches = pipeline.train_batches(mixture, config.batch_size, config.seed, jax.process_index(), jax.process_count())
    return sources, batches, mean, std


def all_processes_sum(counts: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return counts
    return multihost_utils.process_allgather(counts).sum(axis=0)


def check_data(config: ml_collections.ConfigDict) -> None:
    """Refuses data that cannot fit the model before any step runs: token ids beyond the
    embedding table would read garbage (NaN on some backends), not fail."""
    vocab = Tokenizer(config.data.tokenizer, config.model.text.length).vocab_size
    if vocab > config.model.text.vocab_size:
        raise ValueError(
            f"data.tokenizer={config.data.tokenizer!r} has {vocab} ids but model.text.vocab_size="
            f"{config.model.text.vocab_size}: set model.text.vocab_size to at least {vocab}"
        )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        records.write_json(workdir, "config.json", config.to_dict())


def import_siglip2(config: ml_collections.ConfigDict, path: str, workdir: str) -> int:
    """Writes step 0 of `workdir` (params and config, no optimizer state) with SigLIP 2's towers
    from `path`; `train` continues from it. Refuses a workdir that already has checkpoints."""
    checkpoints = Checkpoints(workdir)
    if checkpoints.latest_step() is not None:
        raise ValueError(f"{workdir} already holds step {checkpoints.latest_step()}: use a new workdir")
    params = run_state.initial_params(run_state.setup(config), config.seed, path)
    checkpoints.save(0, params, config=config)
    checkpoints.close()
    save_config(config, workdir)
    return 0


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains to `config.total_steps`, resuming from the latest checkpoint in `workdir` if there
    is one. Returns the last logged metrics."""
    check_data(config)
    save_config(config, workdir)
    run = run_state.setup(config)
    opt = run_state.optimizer(config, run)
    params_abstract = run_state.abstract_params(run)

    sources, batches, mean, std = training_batches(config)
    iterator = pipeline.iterate(batches, workers=config.data.workers)

    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep)
    start = checkpoints.latest_step()
    if start is None:
        start = 0
        params = run_state.initial_params(run, config.seed, config.init.siglip2)
        opt_state = opt.init(params)
        seen = np.zeros(len(sources), np.int64)
    else:
        logging.info("resuming from step %d in %s", start, checkpoints.directory)
        restored = checkpoints.restore(start, params_abstract, opt.abstract_state, iterator)
        params = restored["params"]
        opt_state = restored["opt_state"] if "opt_state" in restored else opt.init(params)
        progress = restored.get("progress", {}).get("samples_seen", {})
        seen = np.array([progress.get(s.name, 0) for s in sources], np.int64)

    batch_sharding = sharding.batch_sharding(run.mesh)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step_fn = train_step.jit_train_step(run, opt, config, mean, std)
        local = next(iterator)
        first = global_batch(local, batch_sharding)
        compiled = step_fn.lower(params, opt_state, first).compile()
    compiled_flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
    # MFU counts the model's FLOPs, not what XLA compiled: that includes rematerialisation and
    # counts the ring loss's scan body once.
    model_flops = flops.train_flops_per_sample(config.model, config.batch_size) * config.batch_size / run.mesh.size
    peak = peak_flops_per_device(jax.devices()[0])

    log = MetricsLog(workdir, total_steps=config.total_steps, start=start)
    preemption = Preemption()
    # With gradient accumulation every optimizer step takes `accum` micro-batches; steps,
    # checkpoints and the schedule count optimizer steps.
    accum = config.optim.accum_steps
    last, batch, timer, steps_timed = {}, first, time.perf_counter(), 0
    local_seen = np.zeros(len(sources), np.int64)  # this process's rows since the start or resume
    try:
        for micro_step in range(start * accum + 1, config.total_steps * accum + 1):
            params, opt_state, metrics = compiled(params, opt_state, batch)
            local_seen += np.bincount(local["source_index"], minlength=len(sources))
            if micro_step % accum:
                local = next(iterator)
                batch = global_batch(local, batch_sharding)
                continue
            step = micro_step // accum
            steps_timed += 1
            final = step == config.total_steps
            stop = preemption.requested()
            save = step % config.checkpoint.every_steps == 0 or final or stop
            logged = step % config.log.every_steps == 0 or final or step == start + 1
            if logged or save:
                total_seen = seen + all_processes_sum(local_seen)
            if logged:
                metrics = jax.device_get(metrics)
                elapsed = (time.perf_counter() - timer) / steps_timed
                last = dict(
                    {k: float(v) for k, v in metrics.items()},
                    step=step,
                    learning_rate=float(opt.schedule(step - 1)),
                    chance_top1=1.0 / config.batch_size,
                    step_time=elapsed,
                    samples_per_second=config.batch_size * accum / elapsed,
                    flops_per_device=model_flops * accum,
                    compiled_flops_per_device=compiled_flops * accum,
                    mfu=model_flops * accum / elapsed / peak if peak else None,
                    **{f"seen_{s.name}": int(n) for s, n in zip(sources, total_seen)},
                )
                log.write(last)
                timer, steps_timed = time.perf_counter(), 0
            log.advance()
            if save:
                progress = dict(samples_seen={s.name: int(n) for s, n in zip(sources, total_seen)})
                checkpoints.save(step, params, opt_state, iterator, config, progress)
                if stop and not final:
                    logging.warning("saved step %d after SIGTERM; exiting", step)
                    break
            if not final:
                local = next(iterator)
                batch = global_batch(local, batch_sharding)
    finally:
        preemption.restore()
        checkpoints.close()
        log.close()
        iterator.close()
    return last
