"""The training step: the device half of the preprocessing, forward, the sigmoid loss (ring or
dense), backward and the optimizer update, jitted with the shardings and donation that
caip-train runs and caip-compile lowers; and the abstract global batch it takes, so that the
step can be lowered without data.
"""
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from caip_jax import device_prep, loss, sharding
from caip_jax.data.schema import NUM_HANDS, NUM_KEYPOINTS
from caip_jax.run_state import Optimizer, Setup

# What goes to the devices of what Preprocess makes (the rest is metadata).
BATCH_KEYS = ("image", "jitter", "text", "translation", "translation_scale", "rotation", "valid", "source_index")

LOSSES = ("ring", "dense")


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


def make_loss_fn(model: nn.Module, mesh, config: ml_collections.ConfigDict, mean, std) -> Callable:
    """(params, batch) -> (loss, top1): colour jitter, action chunks normalised with `mean`,
    `std` [S, 2, 21, 9] per source, forward and the loss `config.loss`."""
    contrastive = contrastive_loss(config.loss, mesh)

    def loss_fn(params, batch):
        action, action_mask = device_prep.action_chunks(
            batch, config.model.action.horizon, config.data.delta, mean, std
        )
        image = device_prep.color_jitter(batch["image"], batch["jitter"])
        out = model.apply({"params": params}, image, batch["text"], action, action_mask)
        z_image = loss.l2_normalize(out["image_pooled"])
        z_action = loss.l2_normalize(out["action_embedding"])
        return contrastive(z_image, z_action, params["t"], params["b"])

    return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh, config: ml_collections.ConfigDict, mean, std):
    """(params, opt_state, batch) -> (params, opt_state, metrics): `make_loss_fn`'s loss, its
    gradient and the optimizer update."""
    loss_fn = make_loss_fn(model, mesh, config, mean, std)

    def step(params, opt_state, batch):
        (value, top1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        norm = applied_gradient_norm(grads, opt_state)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(
            loss=value,
            top1=top1,
            grad_norm=norm,
            temperature=jnp.exp(params["t"]),
            bias=params["b"],
        )
        return params, opt_state, metrics

    return step


def applied_gradient_norm(grads, opt_state) -> jax.Array:
    """The norm of the gradient the optimizer is given: with accumulation (optax.MultiSteps, its
    running mean `acc_grads` over the step's micro-batches) the mean so far including `grads`,
    which at the step's last micro-batch is the mean gradient that is clipped and applied (over
    the leaves that accumulate: frozen ones hold none)."""
    accumulated = optax.tree.get(opt_state, "acc_grads")
    if accumulated is None:
        return optax.tree.norm(grads)
    seen = optax.tree.get(opt_state, "mini_step")
    by_path = dict(jax.tree_util.tree_leaves_with_path(grads))
    return optax.tree.norm([a + (by_path[path] - a) / (seen + 1) for path, a in jax.tree_util.tree_leaves_with_path(accumulated)])


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
