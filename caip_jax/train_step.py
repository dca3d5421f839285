"""The training step: the device half of the preprocessing, forward, the sigmoid loss (ring or
dense), backward and the optimizer update, jitted with the shardings and donation that
caip-train runs and caip-compile lowers; and the abstract global batch it takes, so that the
step can be lowered without data.
"""
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from caip_jax import device_prep, loss, sharding
from caip_jax.data.schema import NUM_HANDS, NUM_KEYPOINTS
from caip_jax.run_state import Optimizer, Setup

# What goes to the devices of what Preprocess makes (the rest is metadata).
BATCH_KEYS = ("image", "jitter", "text", "translation", "translation_scale", "rotation", "valid", "source_index")

LOSSES = ("ring", "dense")
BATCH_AXES = ("data", "fsdp")  # sharding.batch_sharding's


def contrastive_loss(name: str, mesh: jax.sharding.Mesh) -> Callable:
    """`config.loss` -> (z_image [B, D], z_action [B, D], t, b) -> (loss, top1): "ring" passes
    the action embeddings around the devices (no [B, B] matrix anywhere), "dense" scores the
    whole [B, B] matrix (XLA gathers the embeddings)."""
    if name == "ring":
        return lambda z_image, z_action, t, b: loss.chunked_sigmoid_loss(z_image, z_action, t, b, mesh)
    if name == "dense":
        return lambda z_image, z_action, t, b: (
            loss.sigmoid_loss(z_image, z_action, t, b),
            loss.retrieval_top1(z_image, z_action),
        )
    raise ValueError(f"config.loss={name!r} is not one of {LOSSES}")


def make_embed_fn(model: nn.Module, config: ml_collections.ConfigDict, mean, std) -> Callable:
    """(params, batch of b) -> (z_image [b, D], z_action [b, D]) float32, L2-normalised: colour
    jitter, action chunks normalised with `mean`, `std` [S, 2, 21, 9] per source, forward."""

    def embed(params, batch):
        action, action_mask = device_prep.action_chunks(
            batch, config.model.action.horizon, config.data.delta, mean, std
        )
        image = device_prep.color_jitter(batch["image"], batch["jitter"])
        out = model.apply({"params": params}, image, batch["text"], action, action_mask)
        return loss.l2_normalize(out["image_pooled"]), loss.l2_normalize(out["action_embedding"])

    return embed


def make_loss_fn(model: nn.Module, mesh, config: ml_collections.ConfigDict, mean, std) -> Callable:
    """(params, batch) -> (loss, top1): `make_embed_fn`'s embeddings and the loss `config.loss`."""
    contrastive, embed = contrastive_loss(config.loss, mesh), make_embed_fn(model, config, mean, std)

    def loss_fn(params, batch):
        z_image, z_action = embed(params, batch)
        return contrastive(z_image, z_action, params["t"], params["b"])

    return loss_fn


def batch_ways(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split: the size of the batch axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def micro_batch(x: jax.Array, i: jax.Array, k: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """Micro-batch i of k of `x` [B, ...] (split over the n batch ways): rows [i m, (i + 1) m)
    of every device's B / n rows (m = B / (n k)), [B / k, ...] split over the same ways. Each
    device keeps its own rows, so no data moves (a reshape to [k, B / k] would give micro-batch i
    to devices i n / k.. only: an all-to-all), and nothing is copied but the slice."""
    n, rest = batch_ways(mesh), x.shape[1:]
    x = jax.lax.with_sharding_constraint(x.reshape(n, k, x.shape[0] // (n * k), *rest), NamedSharding(mesh, P(BATCH_AXES)))
    x = jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False).reshape(-1, *rest)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))


def merge_micro_batches(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """Micro-batches [k, B / k, ...] stacked by a scan -> [B, ...] in the batch's order (the
    inverse of `micro_batch` over i = 0..k-1), with no data moved between devices."""
    n, (k, rows), rest = batch_ways(mesh), x.shape[:2], x.shape[2:]
    x = jax.lax.with_sharding_constraint(x.reshape(k, n, rows // n, *rest), NamedSharding(mesh, P(None, BATCH_AXES)))
    return jax.lax.with_sharding_constraint(x.swapaxes(0, 1).reshape(k * rows, *rest), NamedSharding(mesh, P(BATCH_AXES)))


def make_accumulated_value_and_grad(model: nn.Module, mesh, config: ml_collections.ConfigDict, mean, std) -> Callable:
    """(params, batch of B) -> ((loss, top1), grads): the value and gradient of the loss over the
    whole batch, as `jax.value_and_grad(make_loss_fn(...))` gives them, computed in
    k = `config.optim.accum_steps` micro-batches of B / k so that activations are held for one
    micro-batch only (the "gradient cache" of Gao et al. 2021, open_clip's accum_freq):

      pass 1 (lax.scan, no gradient): every micro-batch's embeddings, kept: 2 [B, D] float32;
      the loss over all of them (every sample meets all B - 1 negatives) and its gradient with
      respect to the embeddings, t and b;
      pass 2 (lax.scan): each micro-batch's forward again under jax.vjp, pulled back from its
      embeddings' cotangents, summed into the parameter gradient.

    The sigmoid loss does not split into per-micro-batch terms, so accumulating micro-batch
    gradients (optax.MultiSteps) would train another objective; this costs one more forward."""
    k = config.optim.accum_steps
    contrastive, embed = contrastive_loss(config.loss, mesh), make_embed_fn(model, config, mean, std)
    pick = lambda tree, i: jax.tree.map(lambda x: micro_batch(x, i, k, mesh), tree)

    def value_and_grad(params, batch):
        frozen = jax.lax.stop_gradient(params)
        _, embeddings = jax.lax.scan(lambda _, i: (None, embed(frozen, pick(batch, i))), None, jnp.arange(k))
        z_image, z_action = (merge_micro_batches(z, mesh) for z in embeddings)
        value, pull, top1 = jax.vjp(contrastive, z_image, z_action, params["t"], params["b"], has_aux=True)
        dz_image, dz_action, dt, db = pull(jnp.ones_like(value))

        def backward(total, i):
            _, pull_params = jax.vjp(lambda p: embed(p, pick(batch, i)), params)
            return jax.tree.map(jnp.add, total, pull_params(pick((dz_image, dz_action), i))[0]), None

        grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), jnp.arange(k))
        return (value, top1), dict(grads, t=grads["t"] + dt, b=grads["b"] + db)

    return value_and_grad


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh, config: ml_collections.ConfigDict, mean, std):
    """(params, opt_state, batch) -> (params, opt_state, metrics): the loss over the batch, its
    gradient (in `config.optim.accum_steps` micro-batches if > 1) and one optimizer update."""
    if config.optim.accum_steps > 1:
        value_and_grad = make_accumulated_value_and_grad(model, mesh, config, mean, std)
    else:
        value_and_grad = jax.value_and_grad(make_loss_fn(model, mesh, config, mean, std), has_aux=True)

    def step(params, opt_state, batch):
        (value, top1), grads = value_and_grad(params, batch)
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


def jit_train_step(run: Setup, opt: Optimizer, config: ml_collections.ConfigDict, mean, std):
    """The step jitted over `run.mesh`: parameters and optimizer state stay on their shards and
    are donated, the batch is split over the batch axes, the metrics come back replicated.
    Lower it inside `jax.set_mesh(run.mesh)` and `nn.logical_axis_rules(LOGICAL_AXIS_RULES)`."""
    replicated = sharding.replicated(run.mesh)
    return jax.jit(
        make_train_step(run.model, opt.tx, run.mesh, config, mean, std),
        in_shardings=(run.param_shardings, opt.state_shardings, sharding.batch_sharding(run.mesh)),
        out_shardings=(run.param_shardings, opt.state_shardings, replicated),
        donate_argnums=(0, 1),
    )


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `config.batch_size` samples as `pipeline.Preprocess` makes them (and
    `source_index`), as ShapeDtypeStructs split over the batch axes of `mesh`:

        image [B, S, S, 3] uint8, jitter [B, 3] float32, text [B, L] int32,
        translation, rotation [B, T, 2, 21, 3] int16, translation_scale [B, 1] float32,
        valid [B, T + 1, 2] bool, source_index [B] int32
    """
    b, s, t = config.batch_size, config.model.image_size, config.model.action.horizon
    pose = (b, t, NUM_HANDS, NUM_KEYPOINTS, 3)
    shapes = dict(
        image=((b, s, s, 3), jnp.uint8),
        jitter=((b, 3), jnp.float32),
        text=((b, config.model.text.length), jnp.int32),
        translation=(pose, jnp.int16),
        translation_scale=((b, 1), jnp.float32),
        rotation=(pose, jnp.int16),
        valid=((b, t + 1, NUM_HANDS), jnp.bool_),
        source_index=((b,), jnp.int32),
    )
    placed = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=placed) for k in BATCH_KEYS}
