"""What a run is made of, built from its config over an explicit list of devices: the model, the
mesh, the abstract and initial (random or SigLIP 2) parameters, the optimizer with its sharded
state, and the action normalisation. Training, evaluation and ahead-of-time compilation (where
the devices are those of a TPU topology this host does not have) all build a run here.
"""
import dataclasses
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
    shardings = sharding.param_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh)
    return Setup(model, mesh, shardings, init_fn)


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
