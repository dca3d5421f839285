"""The optimizer: AdamW with warmup + cosine schedule, global-norm clipping, weight decay on
kernels only, per-part learning-rate multipliers and frozen parts. (Gradient accumulation is the
train step's: `accum_steps` only lives here among the optimizer's fields.)

`make_optimizer(config.optim, total_steps)` returns `(tx, schedule)`; `tx` works on the plain
parameter tree (`nn.unbox`ed: nested dicts of arrays). `state_shardings` gives the shardings to
create its state with, so that the state is split like the parameters.

Parameters are selected by patterns (`frozen`, `lr_mults`, `weight_decay_pattern`): a regex
that matches a parameter's '/'-joined path (`img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/
kernel`) in full, or a leading run of its components. So "txt" selects the whole text tower,
"img/MAPHead_0" the image head, ".*/kernel" every kernel, and "t" only `t` (not `txt/...`). A
pattern that selects no parameter is an error naming the field.

Parameters the training loss never reaches (`UNREACHED`) are frozen as `frozen` parts are:
weight decay alone would otherwise pull them away from their SigLIP 2 values.

Per trainable leaf the update is the AdamW update with the part's learning rate:
  -schedule(step) * lr_mult * (adam(g) + weight_decay * param [kernels only]),
so the decay is decoupled and follows both the schedule and the multiplier, as optax.adamw
(or a PyTorch AdamW parameter group) with learning rate `schedule * lr_mult` would do.
"""
import math
import numbers
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
MU_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Parts of CAIP that the training loss never reaches: the image tower's own MAP head (output
# `image_map`) and the text tower's projection (`text_pooled`). The loss pools `patch_features`
# with `text_tokens` instead, so these get exactly zero gradient, and AdamW's decay alone would
# shrink their kernels (to 0.61x over the default 100,000 steps), moving exported outputs with no
# learning signal. They are always frozen: no update, no optimizer state. tests/test_optim.py
# checks this list against the gradient of the training loss.
UNREACHED = ("img/MAPHead_0", "txt/head")


def optim_config() -> ml_collections.ConfigDict:
    """The defaults of `config.optim`."""
    return ml_collections.ConfigDict(
        dict(
            # Peak learning rate. SigLIP trained from scratch at 1e-3; CAIP starts its image and
            # text towers from SigLIP 2, so a tenth of that. Raise it for the fresh `act/` and
            # `pool/` with `lr_mults` if they learn too slowly.
            learning_rate=1e-4,
            # Linear warmup from 0 to `learning_rate`: `warmup_steps` optimizer steps if set,
            # else round(warmup_fraction * total_steps) (3% as big_vision's SigLIP LiT config).
            warmup_steps=ml_collections.FieldReference(None, field_type=int),
            warmup_fraction=0.03,
            # Cosine decay after the warmup, reaching final_lr_fraction * learning_rate at
            # total_steps (0: to zero, as big_vision's 'cosine').
            final_lr_fraction=0.0,
            # Adam. b2 = 0.95, not optax's 0.999: SigLIP (Zhai et al. 2023, "stabilizing
            # large-batch training") lowered it to 0.95 after gradient-norm spikes made its
            # large-batch sigmoid-loss training unstable at 0.999. CAIP trains the same loss
            # at large batch, and a shorter second-moment memory also follows the gradient
            # scale of the freshly initialised `act/` and `pool/` as it moves early on.
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            # dtype of Adam's first moment: 'bfloat16' halves its memory (some big_vision
            # configs do this); the second moment stays float32.
            mu_dtype="float32",
            # Decoupled weight decay with optax.adamw semantics: each step subtracts
            # lr(step) * weight_decay * param. SigLIP's big_vision config (lr 1e-3, wd 1e-4,
            # where big_vision's wd follows the schedule's shape but not lr) is 0.1 here.
            weight_decay=0.1,
            # Which parameters decay. Kernels only, as big_vision (`wd_mults` default
            # '.*/kernel$'): Dense, attention projection and patch-conv kernels decay; biases,
            # LayerNorm, `pos_embedding`, probes, `act/cls`, `t`, `b` do not, and neither does
            # the 256k-row token embedding `txt/Embed_0/embedding`, whose rows for rare tokens
            # see almost no gradient and would only shrink away from their SigLIP 2 values.
            weight_decay_pattern=".*/kernel",
            # Clip the global norm of the (trainable) gradient; 0 or None: off.
            grad_clip_norm=1.0,
            # ((pattern, multiplier), ...): the learning rate (decay included) of parameters
            # the first matching pattern selects is multiplied by it; others get 1.
            # E.g. (("txt", 0.1),). Multipliers must be > 0: use `frozen` to stop training.
            lr_mults=(),
            # (pattern, ...): parameters that get no update and keep no optimizer state, so
            # a frozen tower costs no Adam memory; their gradients are left out of the clipping
            # norm. E.g. ("txt",). `UNREACHED` parts are frozen in any case.
            frozen=(),
            # Gradient accumulation: the step computes the loss and gradient of the global batch
            # (`batch_size`) in k micro-batches of batch_size / k, holding the activations of
            # one at a time (train_step.make_accumulated_value_and_grad): the same gradient as
            # k = 1, exactly (every sample still meets all batch_size - 1 negatives), for one
            # more forward pass. One optimizer update per step; no optimizer state.
            accum_steps=1,
        )
    )


def _require(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def _check_patterns(field: str, patterns):
    _require(
        isinstance(patterns, (tuple, list)) and all(isinstance(p, str) for p in patterns),
        f"optim.{field}={patterns!r} must be a tuple of pattern strings, e.g. ('txt',)",
    )
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"optim.{field}: {p!r} is not a valid regex ({e})") from None


def num_warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """The warmup length in optimizer steps: `warmup_steps`, else the fraction of `total_steps`."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return round(config.warmup_fraction * total_steps)


def validate(config: ml_collections.ConfigDict, total_steps: int):
    """Checks `config` (the `optim` part of a run config) against `total_steps`; every error
    names the offending field. Patterns are checked against the parameters in `tx.init`."""
    unknown = sorted(set(config.keys()) - set(optim_config().keys()))
    _require(not unknown, f"optim.{', optim.'.join(unknown)}: unknown field(s); known: {sorted(optim_config())}")
    _require(
        isinstance(total_steps, numbers.Integral) and total_steps > 0,
        f"total_steps={total_steps} must be a positive int",
    )
    _require(config.learning_rate > 0, f"optim.learning_rate={config.learning_rate} must be positive")
    _require(
        0 <= config.warmup_fraction <= 1, f"optim.warmup_fraction={config.warmup_fraction} must be in [0, 1]"
    )
    _require(
        config.warmup_steps is None or 0 <= config.warmup_steps <= total_steps,
        f"optim.warmup_steps={config.warmup_steps} must be in [0, total_steps={total_steps}]",
    )
    _require(
        0 <= config.final_lr_fraction <= 1,
        f"optim.final_lr_fraction={config.final_lr_fraction} must be in [0, 1]",
    )
    for field in ("b1", "b2"):
        _require(0 <= config[field] < 1, f"optim.{field}={config[field]} must be in [0, 1)")
    _require(config.eps > 0, f"optim.eps={config.eps} must be positive")
    _require(config.mu_dtype in MU_DTYPES, f"optim.mu_dtype={config.mu_dtype!r} is not one of {sorted(MU_DTYPES)}")
    _require(config.weight_decay >= 0, f"optim.weight_decay={config.weight_decay} must be >= 0")
    _check_patterns("weight_decay_pattern", (config.weight_decay_pattern,))
    _require(
        not config.grad_clip_norm or config.grad_clip_norm > 0,
        f"optim.grad_clip_norm={config.grad_clip_norm} must be positive, or 0/None to disable clipping",
    )
    _require(
        isinstance(config.accum_steps, numbers.Integral) and config.accum_steps >= 1,
        f"optim.accum_steps={config.accum_steps} must be an int >= 1",
    )
    _check_patterns("frozen", config.frozen)
    lr_mults = config.lr_mults
    _require(
        isinstance(lr_mults, (tuple, list)) and all(isinstance(e, (tuple, list)) and len(e) == 2 for e in lr_mults),
        f"optim.lr_mults={lr_mults!r} must be a tuple of (pattern, multiplier) pairs, e.g. (('txt', 0.1),)",
    )
    _check_patterns("lr_mults", [p for p, _ in lr_mults])
    for pattern, mult in lr_mults:
        _require(
            isinstance(mult, (int, float)) and mult > 0,
            f"optim.lr_mults: multiplier {mult!r} of {pattern!r} must be positive (use optim.frozen to freeze)",
        )


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """optimizer step -> learning rate: linear 0 -> peak over the warmup, then cosine to
    `final_lr_fraction * peak` at `total_steps`, constant after. The update of step s (0-based)
    uses schedule(s), so with a warmup the first update only fills Adam's moments."""
    peak, end = config.learning_rate, config.final_lr_fraction * config.learning_rate
    warmup, total_steps = num_warmup_steps(config, total_steps), int(total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, ramp, cosine)

    return schedule


def _matches(pattern: str, name: str) -> bool:
    """`pattern` matches the '/'-joined path `name` in full, or a leading run of its parts."""
    return re.fullmatch(f"(?:{pattern})(?:/.*)?", name) is not None


def _names(tree: PyTree) -> PyTree:
    """The tree with each leaf replaced by its '/'-joined path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
    )


def _check_selects(field: str, patterns, names: list[str]):
    """Every pattern of `field` selects at least one of `names`."""
    tops = sorted({n.split("/")[0] for n in names})
    for p in patterns:
        _require(
            any(_matches(p, n) for n in names),
            f"optim.{field}: pattern {p!r} matches no parameter (top-level names: {', '.join(tops)})",
        )


def _labels_fn(config: ml_collections.ConfigDict) -> Callable[[PyTree], PyTree]:
    """tree -> 'frozen' / 'trainable' per leaf (`frozen` and `UNREACHED` patterns), checking that
    every pattern of the config selects something."""

    def labels(tree):
        names = _names(tree)
        flat = jax.tree.leaves(names)
        _check_selects("frozen", config.frozen, flat)
        _check_selects("lr_mults", [p for p, _ in config.lr_mults], flat)
        if config.weight_decay:
            _check_selects("weight_decay_pattern", (config.weight_decay_pattern,), flat)
        frozen = lambda n: any(_matches(p, n) for p in (*config.frozen, *UNREACHED))
        return jax.tree.map(lambda n: "frozen" if frozen(n) else "trainable", names)

    return labels


def _scale_by_lr_mults(lr_mults) -> optax.GradientTransformation:
    """Multiplies each update by the multiplier of the first pattern of `lr_mults` matching its
    path (1 if none). Stateless; paths come from the update tree, so no params are needed."""

    def mult(name: str) -> float:
        return next((m for p, m in lr_mults if _matches(p, name)), 1.0)

    def update(updates, state, params=None):
        del params
        names = _names(updates)
        return jax.tree.map(lambda u, n: u * mult(n), updates, names), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _trainable_tx(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW on the trainable parameters, clipping their gradient's global norm first."""
    decay_mask = lambda params: jax.tree.map(lambda n: _matches(config.weight_decay_pattern, n), _names(params))
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm else optax.identity(),
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps, mu_dtype=MU_DTYPES[config.mu_dtype]),
        optax.add_decayed_weights(config.weight_decay, decay_mask) if config.weight_decay else optax.identity(),
        _scale_by_lr_mults(tuple(config.lr_mults)),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`config` (the `optim` part of a run config), `total_steps` optimizer steps ->
    (tx, schedule): `tx.update(grads, opt_state, params)` needs `params` (weight decay);
    `schedule(step)` is the base learning rate at optimizer step `step`, for logging."""
    validate(config, total_steps)
    schedule = make_schedule(config, total_steps)
    tx = optax.multi_transform(
        {"trainable": _trainable_tx(config, schedule), "frozen": optax.set_to_zero()},
        _labels_fn(config),
    )
    return tx, schedule


def _is_sharding(x) -> bool:
    return isinstance(x, (jax.sharding.Sharding, jax.sharding.PartitionSpec))


def state_shardings(tx: optax.GradientTransformation, params: PyTree, param_shardings: PyTree, default):
    """The shardings (or PartitionSpecs) of `tx.init(params)`, for
    `jax.jit(tx.init, out_shardings=...)`: each state array that mirrors a parameter (Adam's mu
    and nu) gets that parameter's entry of `param_shardings`, the rest (step
    counters) `default`. Needed because jit gives the zeros of a fresh state no sharding of
    their own: left to it, the whole state lands on one device. `params` may be abstract."""
    leaves = lambda tree, **kw: jax.tree_util.tree_leaves_with_path(tree, **kw)
    by_name = {jax.tree_util.keystr(k): s for k, s in leaves(param_shardings, is_leaf=_is_sharding)}
    shapes = {jax.tree_util.keystr(k): tuple(p.shape) for k, p in leaves(params)}

    def pick(path, leaf):
        # A state path ends with its parameter's path (`...mu['img']['embedding']['kernel']`);
        # keystr's "['...']" components keep `['t']` from matching `['txt']`.
        name = jax.tree_util.keystr(path)
        hits = [n for n in by_name if name.endswith(n) and shapes[n] == tuple(leaf.shape)]
        return by_name[max(hits, key=len)] if hits else default

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))
