"""The training loop: init (random or SigLIP 2) or restore, the jitted sharded step, metrics,
checkpoints and preemption. Every process of a multi-host run runs `train` with the same config.
"""
import dataclasses
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from caip_jax import actions, device_prep, loss, optim, sharding
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline, records
from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from caip_jax.data.tokenizer import Tokenizer
from caip_jax.init import siglip2
from caip_jax.metrics import MetricsLog, peak_flops_per_device
from caip_jax.models import dummy_inputs, model_from_config

# What goes to the devices of what Preprocess makes (the rest is metadata).
BATCH_KEYS = ("image", "jitter", "text", "translation", "translation_scale", "rotation", "valid", "source_index")


@dataclasses.dataclass
class Setup:
    """What a run is made of, built the same way by training and by the SigLIP 2 import."""

    model: nn.Module
    mesh: jax.sharding.Mesh
    param_shardings: Any
    init_fn: Any  # rng -> boxed variables


def setup(config: ml_collections.ConfigDict) -> Setup:
    model = model_from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    inputs = dummy_inputs(config.model)
    init_fn = lambda rng: model.init(rng, **inputs)["params"]
    shardings = sharding.param_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh)
    return Setup(model, mesh, shardings, init_fn)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """Abstract arrays (shape, dtype) placed by `shardings`: restore and lowering targets."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_params(run: Setup) -> Any:
    """Shapes, dtypes and shardings of the parameters (restore targets)."""
    return with_shardings(nn.unbox(jax.eval_shape(run.init_fn, jax.random.key(0))), run.param_shardings)


def initial_params(run: Setup, seed: int, siglip2_path: str = "") -> Any:
    """Random parameters created on their shards; with `siglip2_path`, the image and text towers
    (and t, b) replaced by SigLIP 2's, each process reading only the slices its devices hold."""
    params, _ = sharding.sharded_init(run.init_fn, jax.random.key(seed), run.mesh)
    if not siglip2_path:
        return params
    loaded = siglip2.init_from_siglip2(abstract_params(run), siglip2_path)
    place = lambda value, current: (
        current
        if isinstance(value, jax.ShapeDtypeStruct)
        else jax.make_array_from_callback(value.shape, current.sharding, lambda index: value[index])
    )
    return jax.tree.map(place, loaded, params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh, config: ml_collections.ConfigDict, mean, std):
    """(params, opt_state, batch) -> (params, opt_state, metrics): the device half of the
    preprocessing (colour jitter, action chunks normalised with `mean`, `std` [S, 2, 21, 9] per
    source), forward, the ring sigmoid loss, backward, optimizer update."""

    def loss_fn(params, batch):
        action, action_mask = device_prep.action_chunks(
            batch, config.model.action.horizon, config.data.delta, mean, std
        )
        image = device_prep.color_jitter(batch["image"], batch["jitter"])
        out = model.apply({"params": params}, image, batch["text"], action, action_mask)
        z_image = loss.l2_normalize(out["image_pooled"])
        z_action = loss.l2_normalize(out["action_embedding"])
        return loss.chunked_sigmoid_loss(z_image, z_action, params["t"], params["b"], mesh)

    def step(params, opt_state, batch):
        (value, top1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(
            loss=value,
            top1=top1,
            grad_norm=optax.tree.norm(grads),
            temperature=jnp.exp(params["t"]),
            bias=params["b"],
        )
        return params, opt_state, metrics

    return step


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
    return {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in BATCH_KEYS}


def training_batches(config: ml_collections.ConfigDict) -> tuple[list[pipeline.Source], Any, np.ndarray, np.ndarray]:
    """The sources of `data.train`, this process's training batches, and the action mean and
    std [S, 2, 21, 9] per source (see `action_stats`)."""
    sources, mean, std = action_stats(config)
    model, data = config.model, config.data
    preprocess = pipeline.Preprocess(data.tokenizer, model.image_size, model.text.length, model.action.horizon)
    mixture = [(s.path, preprocess, s.weight) for s in sources]
    batches = pipeline.train_batches(mixture, config.batch_size, config.seed, jax.process_index(), jax.process_count())
    return sources, batches, mean, std


def action_stats(config: ml_collections.ConfigDict) -> tuple[list[pipeline.Source], np.ndarray, np.ndarray]:
    """The sources of `data.train` and the action mean and std [S, 2, 21, 9] per source: the
    mixture's statistics for every source, or each source's own (`data.stats="per_source"`:
    robot end-effectors and human hands move on other scales), or 0 and 1 with
    `data.normalize=False`."""
    data = config.data
    if data.delta not in actions.DELTAS:
        raise pipeline.DataConfigError(f"data.delta={data.delta!r} is not one of {actions.DELTAS}")
    if data.stats not in ("mixture", "per_source"):
        raise pipeline.DataConfigError(f"data.stats={data.stats!r} is not 'mixture' or 'per_source'")
    sources = pipeline.parse_sources(data.train)
    shape = (len(sources), NUM_HANDS, NUM_KEYPOINTS, FEATURES_PER_KEYPOINT)
    mean, std = np.zeros(shape, np.float32), np.ones(shape, np.float32)
    if data.normalize:
        stats = [read_stats(s.path) for s in sources]
        if data.stats == "mixture":
            stats = [pipeline.mixture_stats(stats, [s.weight for s in sources])] * len(sources)
        mean[:] = [st[data.delta]["mean"] for st in stats]
        std[:] = [st[data.delta]["std"] for st in stats]
    return sources, mean, std


def read_stats(path: str) -> dict:
    try:
        return records.read_json(path, "stats.json")
    except FileNotFoundError as error:
        raise pipeline.DataConfigError(
            f"data.train: {path!r} holds no stats.json: give a record set made by caip-make-records "
            "(or caip-records-to-tfds), or set data.normalize=False"
        ) from error


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
    params = initial_params(setup(config), config.seed, path)
    checkpoints.save(0, params, config=config)
    checkpoints.close()
    save_config(config, workdir)
    return 0


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains to `config.total_steps`, resuming from the latest checkpoint in `workdir` if there
    is one. Returns the last logged metrics."""
    check_data(config)
    save_config(config, workdir)
    run = setup(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    params_abstract = abstract_params(run)
    opt_shardings = optim.state_shardings(tx, params_abstract, run.param_shardings, sharding.replicated(run.mesh))
    opt_abstract = with_shardings(jax.eval_shape(tx.init, params_abstract), opt_shardings)
    init_opt = jax.jit(tx.init, out_shardings=opt_shardings)

    sources, batches, mean, std = training_batches(config)
    iterator = pipeline.iterate(batches, workers=config.data.workers)

    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep)
    start = checkpoints.latest_step()
    if start is None:
        start = 0
        params = initial_params(run, config.seed, config.init.siglip2)
        opt_state = init_opt(params)
        seen = np.zeros(len(sources), np.int64)
    else:
        logging.info("resuming from step %d in %s", start, checkpoints.directory)
        restored = checkpoints.restore(start, params_abstract, opt_abstract, iterator)
        params = restored["params"]
        opt_state = restored["opt_state"] if "opt_state" in restored else init_opt(params)
        progress = restored.get("progress", {}).get("samples_seen", {})
        seen = np.array([progress.get(s.name, 0) for s in sources], np.int64)

    batch_sharding = sharding.batch_sharding(run.mesh)
    replicated = sharding.replicated(run.mesh)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step_fn = jax.jit(
            make_train_step(run.model, tx, run.mesh, config, mean, std),
            in_shardings=(run.param_shardings, opt_shardings, batch_sharding),
            out_shardings=(run.param_shardings, opt_shardings, replicated),
            donate_argnums=(0, 1),
        )
        local = next(iterator)
        first = global_batch(local, batch_sharding)
        compiled = step_fn.lower(params, opt_state, first).compile()
    flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
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
                    learning_rate=float(schedule(step - 1)),
                    chance_top1=1.0 / config.batch_size,
                    step_time=elapsed,
                    samples_per_second=config.batch_size * accum / elapsed,
                    flops_per_device=flops * accum,
                    mfu=flops * accum / elapsed / peak if peak else None,
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
