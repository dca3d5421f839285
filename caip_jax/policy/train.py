"""Training a policy on cached frozen features, and the trained policy that acts.

The decoder's parameters are created on their shards (caip_jax.sharding's logical rules, the
mesh of `config.mesh`), the optimizer is the project's (caip_jax.optim), batches are split over
the mesh's batch axes, and the finished policy is an orbax checkpoint (caip_jax.checkpoint)
whose config carries what acting needs besides the parameters: the instruction vocabulary,
the state and action normalisation and the input sizes. A workdir that already holds the
finished policy is loaded instead of trained again. Only the finished policy is saved: the
policies here train in minutes, and continuing one mid-run would need the optimizer state back
without a data iterator, which Checkpoints.restore_run does not offer.

Batch k is a seeded draw of rows (numpy, seed and k), and the flow noise and times come from
`fold_in(key(seed), k)`: the run is a function of the seed and the data. The keys are
threefry's, whose bits are the same on every backend (XLA's "rbg" generator is not).

A finished policy's config records `data_hash`, a SHA-256 of the rows it trained on (features,
state, instructions, chunks): a policy is reused only for exactly the data it was trained on.
"""
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from caip_jax import optim, run_state, sharding
from caip_jax.checkpoint import Checkpoints
from caip_jax.policy import config as policy_config
from caip_jax.policy import flow
from caip_jax.policy.dataset import Normalizer, TrainingSet
from caip_jax.policy.model import Policy

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def key(seed: int) -> jax.Array:
    """The policy's random keys: threefry, the same bits on CPU, GPU and TPU, so that a rollout
    or a training run is a function of its seed whatever backend runs it."""
    return jax.random.key(seed, impl="threefry2x32")


def flow_times(rng: jax.Array, batch: int, sampling: str) -> jax.Array:
    """Training flow times [batch] (t = 0 noise, 1 data): "beta" is pi0's, t = 0.999 (1 - u),
    u ~ Beta(1.5, 1), denser toward the noise; "uniform" t ~ U(0, 1)."""
    if sampling == "uniform":
        return jax.random.uniform(rng, (batch,))
    if sampling == "beta":
        return 0.999 * (1.0 - jax.random.beta(rng, 1.5, 1.0, (batch,)))
    raise ValueError(f"time_sampling={sampling!r} is not one of {policy_config.TIME_SAMPLING}")


def data_hash(data: TrainingSet) -> str:
    """SHA-256 of the rows a policy trains on (their values, shapes and dtypes, and the
    instruction vocabulary)."""
    digest = hashlib.sha256(json.dumps(list(data.instructions)).encode())
    for name in ("features", "state", "instruction", "chunk", "chunk_mask"):
        array = np.ascontiguousarray(getattr(data, name))
        digest.update(f"{name}{array.shape}{array.dtype}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


BATCH_KEYS = ("features", "state", "instruction", "chunk", "chunk_mask")


def make_model(config: ml_collections.ConfigDict) -> Policy:
    m = config.model
    return Policy(width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                  num_instructions=len(config.instructions), head=m.head, dtype=DTYPES[m.dtype],
                  scan=m.get("scan", False), remat_policy=m.get("remat_policy", "none"))


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> tuple:
    """Zero inputs of the shapes `config.dims` gives, for init and `jax.eval_shape`."""
    d = config.dims
    return (jnp.zeros((batch, *d.features)), jnp.zeros((batch, d.state)), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, config.horizon, d.action)), jnp.zeros((batch,)))


def num_params(config: ml_collections.ConfigDict) -> int:
    """The decoder's parameter count, from shapes alone (nothing allocated)."""
    shapes = jax.eval_shape(_setup(config)[2], key(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


@dataclasses.dataclass
class TrainedPolicy:
    """A policy with its parameters on the mesh; `act` maps raw observations to raw actions."""

    config: ml_collections.ConfigDict
    model: Policy
    mesh: jax.sharding.Mesh
    params: dict
    feature_norm: Normalizer
    state_norm: Normalizer
    action_norm: Normalizer

    def __post_init__(self):
        self._act = jax.jit(self._chunk)

    def _chunk(self, params, features, state, instruction, rng):
        features, state = self.feature_norm.normalize(features), self.state_norm.normalize(state)
        noise = jax.random.normal(rng, (features.shape[0], self.config.horizon, self.config.dims.action))
        if self.config.model.head == "mse":
            chunk = self.model.apply({"params": params}, features, state, instruction, jnp.zeros_like(noise),
                                     jnp.zeros(features.shape[:1]))
        else:
            velocity = lambda x, t: self.model.apply({"params": params}, features, state, instruction, x, t)
            chunk = flow.sample(velocity, noise, self.config.flow_steps)
        return self.action_norm.denormalize(chunk)

    def instruction_id(self, text: str) -> int:
        if text not in self.config.instructions:
            raise ValueError(f"instruction {text!r} is not one the policy was trained on: {list(self.config.instructions)}")
        return list(self.config.instructions).index(text)

    def act(self, features: np.ndarray, state: np.ndarray, instruction: np.ndarray, rng: jax.Array) -> np.ndarray:
        """features [B, N, D], state [B, S] (raw), instruction [B] ids, a key (`key(seed)`) ->
        action chunks [B, T, A] in the demonstrations' units."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return np.asarray(self._act(self.params, features, state, instruction, rng))


def fitted_config(config: ml_collections.ConfigDict, data: TrainingSet) -> ml_collections.ConfigDict:
    """`config` plus what the data fixes: input sizes, instructions and normalisation."""
    config = config.copy_and_resolve_references()
    with config.unlocked():  # a config from the command line is locked
        config.dims = ml_collections.ConfigDict(
            dict(features=list(data.features.shape[1:]), state=data.state.shape[1], action=data.chunk.shape[2]))
        config.instructions = list(data.instructions)
        config.data_hash = data_hash(data)
        config.normalization = ml_collections.ConfigDict(dict(
            features=_feature_normalizer(config, data.features).to_json(),
            state=Normalizer.fit(data.state).to_json(),
            action=Normalizer.fit(data.chunk, data.chunk_mask).to_json(),
        ))
    return config


def _feature_normalizer(config: ml_collections.ConfigDict, features: np.ndarray) -> Normalizer:
    """Each feature dimension standardised over the demonstrations' frames and tokens (features
    [F, N, D]), or left as the encoder gives it (normalize_features false)."""
    if config.normalize_features:
        return Normalizer.fit(features)
    dims = features.shape[-1]
    return Normalizer(np.zeros(dims, np.float32), np.ones(dims, np.float32))


def _loss_fn(model: Policy, head: str, time_sampling: str = "beta"):
    """(params, batch, key) -> the masked velocity (flow) or chunk (mse) regression loss."""

    def loss(params, batch, rng):
        chunk = batch["chunk"]
        apply = lambda x, t: model.apply({"params": params}, batch["features"], batch["state"], batch["instruction"], x, t)
        if head == "mse":
            return flow.masked_mse(apply(jnp.zeros_like(chunk), jnp.zeros(chunk.shape[:1])), chunk, batch["chunk_mask"])
        noise_key, time_key = jax.random.split(rng)
        t = flow_times(time_key, chunk.shape[0], time_sampling)
        x_t, velocity = flow.noisy_chunk(jax.random.normal(noise_key, chunk.shape), chunk, t)
        return flow.masked_mse(apply(x_t, t), velocity, batch["chunk_mask"])

    return loss


def _normalized_rows(config: ml_collections.ConfigDict, data: TrainingSet) -> dict[str, np.ndarray]:
    features, state, action = (Normalizer.from_json(config.normalization[k]) for k in ("features", "state", "action"))
    return dict(features=features.normalize(data.features).astype(np.float32), state=state.normalize(data.state),
                instruction=data.instruction,
                chunk=action.normalize(data.chunk).astype(np.float32), chunk_mask=data.chunk_mask)


def check_fits(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict, data: TrainingSet,
               where: str) -> None:
    """Refuses to reuse the policy of `stored` config for `data` and `config` if the data's
    sizes differ from the policy's or the policy was trained otherwise, naming what differs."""
    d = stored.dims
    for name, have, want in (("action dimension", data.chunk.shape[2], d.action),
                             ("state dimension", data.state.shape[1], d.state),
                             ("feature shape", list(data.features.shape[1:]), list(d.features))):
        if have != want:
            raise ValueError(f"the demonstrations' {name} is {have} but the policy in {where} takes {want}: "
                             "train it on demonstrations of the same robot and encoder, or use another workdir")
    plain = lambda c: json.loads(json.dumps(c.to_dict()))  # tuples and lists alike, as stored
    asked, have = plain(fitted_config(config, data)), plain(stored)
    differ = sorted(k for k in asked.keys() | have.keys() if asked.get(k) != have.get(k))
    if differ:
        other_data = " (other demonstrations or features)" if "data_hash" in differ else ""
        raise ValueError(f"the policy in {where} was trained with other {', '.join(differ)} than asked{other_data}: "
                         "use another workdir")


def train(config: ml_collections.ConfigDict, data: TrainingSet, workdir: str,
          devices: Sequence[jax.Device] | None = None) -> TrainedPolicy:
    """Trains `config`'s policy on `data` for config.total_steps over a mesh of `devices`
    (default: all) and saves it to `workdir`; or loads the finished policy from `workdir` if it
    is there (checking that it fits `data`)."""
    policy_config.validate(config)
    checkpoints = Checkpoints(workdir, keep=1, asynchronous=False)
    finished = checkpoints.latest_step()
    if finished is not None:
        check_fits(checkpoints.restore_config(finished), config, data, workdir)
        checkpoints.close()
        return load(workdir, devices)
    config = fitted_config(config, data)
    model, mesh, init_fn = _setup(config, devices)
    params, param_shardings = sharding.sharded_init(init_fn, key(config.seed), mesh)
    tx, _ = optim.make_optimizer(config.optim, config.total_steps)
    opt_shardings = optim.state_shardings(tx, params, param_shardings, sharding.replicated(mesh))
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    loss = _loss_fn(model, config.model.head, config.get("time_sampling", "uniform"))

    def step(params, opt_state, batch, k):
        value, grads = jax.value_and_grad(loss)(params, batch, jax.random.fold_in(key(config.seed), k))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    rows = _normalized_rows(config, data)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated),
                       out_shardings=(param_shardings, opt_shardings, replicated), donate_argnums=(0, 1))
        start = time.perf_counter()
        for k in range(config.total_steps):
            pick = np.random.default_rng((config.seed, k)).integers(0, len(data), config.batch_size)
            batch = {name: jax.device_put(rows[name][pick], batch_sharding) for name in BATCH_KEYS}
            params, opt_state, value = step(params, opt_state, batch, np.int32(k))
        value = float(value)
    logging.info("policy: %d steps in %.1f s, final loss %.4f", config.total_steps, time.perf_counter() - start, value)
    checkpoints.save(config.total_steps, params, opt_state, config=config)
    checkpoints.close()
    return _trained(config, mesh, params)


def _setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None):
    """-> the model, its mesh over `devices` (default: all) and its boxed init function."""
    model = make_model(config)
    return model, sharding.make_mesh(config.mesh, devices), lambda rng: model.init(rng, *dummy_inputs(config))["params"]


def _trained(config: ml_collections.ConfigDict, mesh, params) -> TrainedPolicy:
    return TrainedPolicy(config, make_model(config), mesh, params,
                         *(Normalizer.from_json(config.normalization[k]) for k in ("features", "state", "action")))


def load(workdir: str, devices: Sequence[jax.Device] | None = None) -> TrainedPolicy:
    """The finished policy of `workdir`, on its training config's mesh shape over `devices`
    (default: all), whatever devices trained it."""
    checkpoints = Checkpoints(workdir, asynchronous=False)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no policy checkpoint: train one first")
    config = checkpoints.restore_config(step)
    _, mesh, init_fn = _setup(config, devices)
    shapes = jax.eval_shape(init_fn, key(0))
    abstract = run_state.with_shardings(nn.unbox(shapes), sharding.param_shardings(shapes, mesh))
    params = checkpoints.restore(step, abstract)["params"]
    checkpoints.close()
    return _trained(config, mesh, params)
