"""What a run is made of, built from its config over an explicit list of devices: the model, the
mesh, the abstract and initial (random or SigLIP 2) parameters, the optimizer with its sharded
state, and the action normalisation. Training, evaluation and ahead-of-time compilation (where
the devices are those of a TPU topology this host does not have) all build a run here.
"""
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from caip_jax import actions, optim, sharding
from caip_jax.data import pipeline, records
from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from caip_jax.init import siglip2
from caip_jax.models import dummy_inputs, model_from_config


@dataclasses.dataclass
class Setup:
    """The model of a run, its mesh and where its parameters live."""

    model: nn.Module
    mesh: jax.sharding.Mesh
    param_shardings: Any
    init_fn: Any  # rng -> boxed variables


def setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Setup:
    """The model of `config.model` over a mesh of `devices` (default: all) shaped by
    `config.mesh`. Allocates nothing: parameters are only traced for their shapes."""
    model = model_from_config(config.model)
    mesh = sharding.make_mesh(config.mesh, devices)
    inputs = dummy_inputs(config.model)
    init_fn = lambda rng: model.init(rng, **inputs)["params"]
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    sharding.check_batch(config.batch_size, mesh)
    check_accumulation(config.batch_size, config.optim.accum_steps, mesh)
    sharding.check_divisible(boxed, mesh)
    return Setup(model, mesh, sharding.param_shardings(boxed, mesh), init_fn)


def check_accumulation(batch_size: int, accum_steps, mesh: jax.sharding.Mesh) -> None:
    """`optim.accum_steps` splits the global batch into micro-batches, each split over the batch
    axes like the batch (train_step.split_micro_batches): batch_size must divide by
    accum_steps x data x fsdp. Names the largest accum_steps below that works and a batch_size."""
    if not isinstance(accum_steps, int) or accum_steps < 1:
        return  # optim.validate names it
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (accum_steps * ways) == 0:
        return
    fits = max(k for k in range(1, accum_steps + 1) if batch_size % (k * ways) == 0)
    unit = accum_steps * ways
    fix = f"use e.g. optim.accum_steps={fits}, or batch_size={-(-batch_size // unit) * unit}"
    if batch_size % accum_steps:
        raise ValueError(f"optim.accum_steps={accum_steps} does not divide batch_size={batch_size} (the global batch): {fix}")
    raise ValueError(
        f"batch_size={batch_size} / optim.accum_steps={accum_steps} = {batch_size // accum_steps} samples per "
        f"micro-batch do not split over the batch axes data x fsdp = {ways} of config.mesh={dict(mesh.shape)}: {fix}"
    )


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """Abstract arrays (shape, dtype) placed by `shardings`: restore and lowering targets."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_params(run: Setup) -> Any:
    """Shapes, dtypes and shardings of the parameters (restore targets)."""
    return with_shardings(nn.unbox(jax.eval_shape(run.init_fn, jax.random.key(0))), run.param_shardings)


def initial_params(run: Setup, seed: int, siglip2_path: str = "", siglip2_logit_scalars: bool = False) -> Any:
    """Random parameters created on their shards; with `siglip2_path`, the image and text towers
    (and t, b if `siglip2_logit_scalars`: config.init) replaced by SigLIP 2's, each process
    reading only the slices its devices hold."""
    params, _ = sharding.sharded_init(run.init_fn, jax.random.key(seed), run.mesh)
    if not siglip2_path:
        return params
    loaded = siglip2.init_from_siglip2(abstract_params(run), siglip2_path, load_loss_scalars=siglip2_logit_scalars)
    place = lambda value, current: (
        current
        if isinstance(value, jax.ShapeDtypeStruct)
        else jax.make_array_from_callback(value.shape, current.sharding, lambda index: value[index])
    )
    return jax.tree.map(place, loaded, params)


@dataclasses.dataclass
class Optimizer:
    """The optimizer of a run and where its state lives."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule  # optimizer step -> learning rate, for logging
    state_shardings: Any
    abstract_state: Any  # shapes, dtypes and shardings of the state: restore and lowering targets
    init: Any  # jitted params -> state, created on its shards


def optimizer(config: ml_collections.ConfigDict, run: Setup) -> Optimizer:
    """`config.optim` over `config.total_steps`, its state split like the parameters of `run`."""
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    if config.nonfinite.policy == "skip":
        # Never apply a non-finite update; the training loop counts them and stops after
        # config.nonfinite.max_consecutive in a row, so optax's own give-up count is not reached.
        # One update per step, accumulated or not: a skipped step leaves nothing half-applied.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    elif config.nonfinite.policy != "stop":
        raise ValueError(f"config.nonfinite.policy={config.nonfinite.policy!r} is not 'stop' or 'skip'")
    params = abstract_params(run)
    shardings = optim.state_shardings(tx, params, run.param_shardings, sharding.replicated(run.mesh))
    abstract = with_shardings(jax.eval_shape(tx.init, params), shardings)
    return Optimizer(tx, schedule, shardings, abstract, jax.jit(tx.init, out_shardings=shardings))


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
        for source in sources:
            check_horizon(source.path, config.model.action.horizon)
        stats = [read_stats(s.path) for s in sources]
        if data.stats == "mixture":
            stats = [pipeline.mixture_stats(stats, [s.weight for s in sources])] * len(sources)
        mean[:] = [st[data.delta]["mean"] for st in stats]
        std[:] = [st[data.delta]["std"] for st in stats]
    return sources, mean, std


def check_horizon(path: str, horizon: int) -> None:
    """stats.json describes chunks of the horizon the records were converted with: normalising
    another horizon's chunks with them would be silently wrong."""
    try:
        converted = records.read_json(path, "summary.json")["options"]["horizon"]
    except (FileNotFoundError, KeyError):
        return  # a record set made without caip-make-records' summary: nothing to compare
    if converted != horizon:
        raise pipeline.DataConfigError(
            f"data.train: {path!r} was converted with horizon {converted} (summary.json) and its stats.json "
            f"describe {converted}-step chunks, but model.action.horizon={horizon}: convert again with "
            f"caip-make-records --horizon {horizon}, or set model.action.horizon={converted}"
        )


def stats_to_json(config: ml_collections.ConfigDict, sources: list[pipeline.Source], mean, std) -> dict:
    """The action normalisation of a run, as its checkpoints and exports keep it."""
    return dict(
        delta=config.data.delta,
        horizon=config.model.action.horizon,
        normalize=config.data.normalize,
        stats=config.data.stats,
        sources={s.name: dict(mean=np.asarray(m).tolist(), std=np.asarray(d).tolist()) for s, m, d in zip(sources, mean, std)},
    )


def stats_from_checkpoint(stored: dict, config, sources, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's action mean and std [S, 2, 21, 9]: a resumed run keeps the action space
    it started with, even if the record sets' stats.json (`mean`, `std`) changed since."""
    names = [s.name for s in sources]
    if list(stored["sources"]) != names or stored["delta"] != config.data.delta or stored["horizon"] != config.model.action.horizon:
        raise pipeline.DataConfigError(
            f"the checkpoint was trained on sources {list(stored['sources'])} with data.delta={stored['delta']!r}, "
            f"model.action.horizon={stored['horizon']}; the config gives {names}, {config.data.delta!r}, "
            f"{config.model.action.horizon}: resume with the same data.train, or start a new workdir"
        )
    kept_mean, kept_std = stats_arrays(stored)
    if not (np.array_equal(kept_mean, mean) and np.array_equal(kept_std, std)):
        logging.warning(
            "the action statistics of data.train differ from those this run started with; it continues with "
            "the checkpoint's (the record sets were rebuilt or changed)"
        )
    return kept_mean, kept_std


def stats_arrays(stored: dict) -> tuple[np.ndarray, np.ndarray]:
    """`stats_to_json`'s dict -> mean, std [S, 2, 21, 9] in its sources' order."""
    per_source = stored["sources"].values()
    return tuple(np.array([entry[k] for entry in per_source], np.float32) for k in ("mean", "std"))


def read_stats(path: str) -> dict:
    try:
        return records.read_json(path, "stats.json")
    except FileNotFoundError as error:
        raise pipeline.DataConfigError(
            f"data.train: {path!r} holds no stats.json: give a record set made by caip-make-records "
            "(or caip-records-to-tfds), or set data.normalize=False"
        ) from error
