"""caip_jax.optim: the schedule, AdamW with its decay mask, clipping, learning-rate multipliers,
frozen parts, against values computed by hand or in numpy; the parts
the loss never reaches, against the training loss's gradient and the training step."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import tiny_run_config
from caip_jax import config as caip_config
from caip_jax import optim, run_state, sharding, train, train_step
from caip_jax.data import pipeline
from caip_jax.models.summary import abstract_params


def make_config(**overrides):
    c = optim.optim_config()
    c.update(overrides)
    return c


def small_tree(seed=0, scale=1.0):
    """A parameter-shaped tree with big_vision names: a kernel and bias, a LayerNorm scale, a
    position embedding, a token embedding, and the loss scalar `t`."""
    rng = np.random.default_rng(seed)
    shapes = {
        "img": {
            "Dense_0": {"kernel": (2, 3), "bias": (3,)},
            "LayerNorm_0": {"scale": (3,)},
            "pos_embedding": (1, 2, 3),
        },
        "txt": {"Embed_0": {"embedding": (5, 3)}, "Dense_0": {"kernel": (3, 2)}},
        "t": (),
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def caip_names():
    """A tiny CAIP's parameter tree (sizes of tests/tiny.py, without its torch import) with
    every leaf a 1-element array of 2.0: what the decay mask sees is the path, not the shape,
    and equal shapes keep the eager update cheap."""
    c = caip_config.model_config("mu/8")
    c.width, c.depth, c.mlp_dim, c.num_heads, c.image_size = 32, 2, 64, 4, 32
    c.text.vocab_size, c.text.length = 100, 16
    c.action.update(horizon=8, width=24, depth=2, mlp_dim=48, num_heads=3)
    return jax.tree.map(lambda _: jnp.full((1,), 2.0), abstract_params(c))


def run(tx, params, grads_list):
    """Applies `tx` to each gradient in turn; returns the list of updates, final params, state."""
    state, update = tx.init(params), jax.jit(tx.update)
    updates = []
    for g in grads_list:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return updates, params, state


def flat(tree):
    """{'/'-joined path: numpy array}."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in leaves}


def to_norm(tree, norm):
    """`tree` scaled to global norm `norm`."""
    return jax.tree.map(lambda x: x * norm / float(optax.tree.norm(tree)), tree)


def test_schedule_matches_formula():
    # peak 1e-3, warmup 10, cosine to 0.1 * peak at 110: after the warmup,
    # lr = 1e-4 + 9e-4 * 0.5 * (1 + cos(pi * (step - 10) / 100)).
    _, schedule = optim.make_optimizer(make_config(learning_rate=1e-3, warmup_steps=10, final_lr_fraction=0.1), 110)
    expected = {
        0: 0.0,
        5: 5e-4,  # halfway up the ramp
        10: 1e-3,  # peak
        35: 1e-4 + 4.5e-4 * (1 + math.sqrt(0.5)),  # a quarter into the decay: cos(pi/4)
        60: 5.5e-4,  # halfway: cos(pi/2) = 0
        110: 1e-4,  # final
        500: 1e-4,  # stays there
    }
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
    # Without warmup_steps, the warmup is round(warmup_fraction * total_steps) = 11 steps.
    _, schedule = optim.make_optimizer(make_config(learning_rate=1e-3, warmup_fraction=0.1), 110)
    np.testing.assert_allclose([float(schedule(1)), float(schedule(11))], [1e-3 / 11, 1e-3], rtol=1e-6)


def test_adamw_two_steps_match_numpy():
    """Two AdamW steps equal Adam with bias correction, b2 = 0.95, and decoupled decay
    lr * wd * param on kernels only (params ~5 so that a wrong decay mask shows)."""
    config = make_config(learning_rate=1e-3, warmup_steps=0, grad_clip_norm=None, weight_decay=0.1)
    tx, schedule = optim.make_optimizer(config, 10)
    params, grads = small_tree(0, scale=5.0), [small_tree(1), small_tree(2)]
    _, got, _ = run(tx, params, grads)

    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    lrs = [1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 10))]  # cosine over 10 steps, step 0 and 1
    np.testing.assert_allclose([float(schedule(0)), float(schedule(1))], lrs, rtol=1e-6)
    p, gs = flat(params), [flat(g) for g in grads]
    for name in p:
        x, m, v = p[name].astype(np.float64), 0.0, 0.0
        for k, lr in enumerate(lrs):
            g = gs[k][name].astype(np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            adam = (m / (1 - b1 ** (k + 1))) / (np.sqrt(v / (1 - b2 ** (k + 1))) + eps)
            x = x - lr * (adam + (wd * x if name.endswith("/kernel") else 0.0))
        np.testing.assert_allclose(flat(got)[name], x, rtol=1e-5, atol=1e-7, err_msg=name)


def is_unreached(name: str) -> bool:
    return any(name == p or name.startswith(p + "/") for p in optim.UNREACHED)


def test_decay_mask_on_caip_params_is_the_kernels():
    """With zero gradients Adam's step is 0, so exactly the decayed leaves move: every `kernel`
    (Dense, attention, patch conv) and nothing else (embeddings, probes, cls, norms, t, b), and
    no kernel of the parts the loss never reaches."""
    params = caip_names()
    tx, _ = optim.make_optimizer(make_config(warmup_steps=0), 100)
    # Eager: compiling this ~200-leaf update costs more than running it once.
    update, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {n for n, u in flat(update).items() if np.any(u != 0)}
    kernels = {n for n in flat(params) if n.endswith("/kernel") and not is_unreached(n)}
    assert moved == kernels
    attention = "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    assert {"img/embedding/kernel", attention, "act/head/kernel", "pool/MAPHead_0/MlpBlock_0/Dense_0/kernel"} <= moved
    undecayed = {"txt/Embed_0/embedding", "img/pos_embedding", "img/MAPHead_0/probe", "act/cls", "t", "b"}
    assert undecayed <= set(flat(params)) - moved
    # Decay is lr * wd * param: 1e-4 * 0.1 * 2.
    np.testing.assert_allclose(np.concatenate([flat(update)[n] for n in sorted(kernels)]), -2e-5, rtol=1e-5)


def test_clipping_equals_prescaled_gradient():
    """A gradient of norm 10 clipped to 1 acts as the same gradient scaled to norm 1. Adam's
    first step is scale-invariant, so the check runs a second, unclipped gradient whose update
    depends on the first one's scale through the second moment."""
    g10, g1, h = to_norm(small_tree(1), 10.0), to_norm(small_tree(1), 1.0), to_norm(small_tree(2), 0.3)
    clipped, _ = optim.make_optimizer(make_config(warmup_steps=0, grad_clip_norm=1.0), 10)
    unclipped, _ = optim.make_optimizer(make_config(warmup_steps=0, grad_clip_norm=None), 10)
    params = small_tree(0)
    a, _, _ = run(clipped, params, [g10, h])
    b, _, _ = run(clipped, params, [g1, h])
    c, _, _ = run(unclipped, params, [g10, h])
    for step in range(2):
        for name, u in flat(a[step]).items():
            np.testing.assert_allclose(u, flat(b[step])[name], rtol=1e-5, atol=1e-10, err_msg=f"{step} {name}")
    assert not np.allclose(flat(a[1])["img/Dense_0/kernel"], flat(c[1])["img/Dense_0/kernel"], rtol=1e-3)


@pytest.fixture(scope="module")
def unscaled_update():
    tx, _ = optim.make_optimizer(make_config(warmup_steps=0), 10)
    (update,), _, _ = run(tx, small_tree(0, scale=5.0), [small_tree(1)])
    return flat(update)


@pytest.mark.parametrize(
    "lr_mults, mults",
    [
        ((("txt", 0.1),), {"txt/Embed_0/embedding": 0.1, "txt/Dense_0/kernel": 0.1}),
        # First matching pattern wins.
        ((("txt/Embed_0", 0.5), ("txt", 0.1)), {"txt/Embed_0/embedding": 0.5, "txt/Dense_0/kernel": 0.1}),
        # "t" is the parameter `t`, not a prefix of "txt".
        ((("t", 2.0),), {"t": 2.0}),
    ],
)
def test_lr_mults_scale_the_update(lr_mults, mults, unscaled_update):
    """The first step's update (Adam and decay alike) is exactly mult x the unscaled one."""
    scaled, _ = optim.make_optimizer(make_config(warmup_steps=0, lr_mults=lr_mults), 10)
    (update,), _, _ = run(scaled, small_tree(0, scale=5.0), [small_tree(1)])
    for name, u in unscaled_update.items():
        np.testing.assert_allclose(flat(update)[name], mults.get(name, 1.0) * u, rtol=1e-6, err_msg=name)


def test_frozen_tower_is_unchanged_and_holds_no_state():
    """txt frozen: its params are bit-identical after several steps, and the optimizer state
    holds no array for it: Adam's mu and nu are exactly one copy each of the other parameters
    (with accum_steps=2 too: accumulation is the train step's, it keeps no state)."""
    params = small_tree(0)
    tx, _ = optim.make_optimizer(make_config(warmup_steps=0, frozen=("txt",), accum_steps=2), 100)
    _, new, state = run(tx, params, [small_tree(s) for s in range(1, 4)])
    state_copies = 2

    before, after = flat(params), flat(new)
    for name in before:
        assert np.array_equal(before[name], after[name]) == name.startswith("txt/"), name

    state_leaves = jax.tree_util.tree_leaves_with_path(state)
    assert not [k for k, _ in state_leaves if "'txt'" in jax.tree_util.keystr(k)]
    # Non-scalar arrays only: the step counters are 0-d, and so are `t` and its moments.
    trainable_bytes = sum(v.nbytes for n, v in before.items() if not n.startswith("txt/") and v.ndim)
    state_bytes = sum(v.nbytes for _, v in state_leaves if v.ndim)
    assert state_bytes == state_copies * trainable_bytes


def test_frozen_gradients_stay_out_of_the_clipping_norm():
    """A huge gradient on frozen txt does not change the other updates. Checked on the second
    step (Adam's first is scale-invariant); with txt trainable the same gradients do."""
    g, h = small_tree(1), jax.tree.map(lambda x: 0.01 * x, small_tree(2))  # h: below the clip
    loud = {**g, "txt": jax.tree.map(lambda x: 1e3 * x, g["txt"])}
    params = small_tree(0)
    for frozen in (("txt",), ()):
        tx, _ = optim.make_optimizer(make_config(warmup_steps=0, frozen=frozen), 10)
        (_, u_quiet), _, _ = run(tx, params, [g, h])
        (_, u_loud), _, _ = run(tx, params, [loud, h])
        same = np.array_equal(flat(u_quiet)["img/Dense_0/kernel"], flat(u_loud)["img/Dense_0/kernel"])
        assert same == bool(frozen), frozen


def test_mu_dtype_bfloat16():
    """mu_dtype='bfloat16': Adam's first moment in bfloat16, the second stays float32."""
    tx, _ = optim.make_optimizer(make_config(mu_dtype="bfloat16"), 10)
    params = small_tree()
    state = tx.init(params)
    n = len(jax.tree.leaves(params))
    moments = sorted(str(x.dtype) for x in jax.tree.leaves(state) if x.dtype != jnp.int32)  # not counters
    assert moments == ["bfloat16"] * n + ["float32"] * n


@pytest.mark.parametrize(
    "overrides, total_steps, message",
    [
        (dict(learning_rate=-1e-3), 100, "optim.learning_rate=-0.001"),
        (dict(warmup_steps=200), 100, "optim.warmup_steps=200"),
        (dict(warmup_fraction=1.5), 100, "optim.warmup_fraction"),
        (dict(), 0, "total_steps=0"),
        (dict(b2=1.0), 100, "optim.b2"),
        (dict(grad_clip_norm=-1.0), 100, "optim.grad_clip_norm"),
        (dict(accum_steps=0), 100, "optim.accum_steps"),
        (dict(mu_dtype="float16"), 100, "optim.mu_dtype"),
        (dict(lr_mults=(("txt", 0.0),)), 100, "optim.lr_mults: multiplier 0.0 of 'txt'"),
        (dict(lr_mults=(("txt[", 0.1),)), 100, "optim.lr_mults: 'txt['"),
        (dict(lr_mult=0.1), 100, "optim.lr_mult: unknown"),
    ],
)
def test_config_errors_name_the_field(overrides, total_steps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        optim.make_optimizer(make_config(**overrides), total_steps)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(frozen=("text",)), "optim.frozen: pattern 'text' matches no parameter"),
        (dict(lr_mults=(("vision", 0.1),)), "optim.lr_mults: pattern 'vision' matches no parameter"),
        (dict(weight_decay_pattern=".*/weight"), "optim.weight_decay_pattern: pattern"),
    ],
)
def test_patterns_that_select_nothing_name_the_field(overrides, message):
    tx, _ = optim.make_optimizer(make_config(**overrides), 100)
    with pytest.raises(ValueError, match=re.escape(message)):
        tx.init(small_tree())


def test_state_shardings_follow_the_params():
    """On 8 devices with kernels split over `fsdp`, a state made with `state_shardings` is split
    like the params (mu and nu), counters replicated, frozen txt absent."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    split, whole = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P())
    shardings = {"img": {"Dense_0": {"kernel": split, "bias": whole}}, "txt": {"kernel": split}, "t": whole}
    params = {"img": {"Dense_0": {"kernel": jnp.ones((4, 16)), "bias": jnp.ones(16)}}}
    params = jax.device_put(dict(params, txt={"kernel": jnp.ones((2, 8))}, t=jnp.ones(())), shardings)
    tx, _ = optim.make_optimizer(make_config(frozen=("txt",), accum_steps=2), 10)
    state = jax.jit(tx.init, out_shardings=optim.state_shardings(tx, params, shardings, whole))(params)
    got = {jax.tree_util.keystr(k): v.sharding for k, v in jax.tree_util.tree_leaves_with_path(state)}
    kernels = [n for n in got if n.endswith("['img']['Dense_0']['kernel']")]
    assert len(kernels) == 2  # mu, nu
    assert all(got[n] == split for n in kernels)
    assert all(s == whole for n, s in got.items() if n not in kernels)
    assert not [n for n in got if "['txt']" in n]


@pytest.fixture(scope="module")
def tiny_run(record_set):
    """The run of tests/tiny_run_config.py on its 8-device mesh, its initial parameters (on the
    host) and its first 3 global batches from the training pipeline."""
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    run = run_state.setup(config)
    params = jax.device_get(run_state.initial_params(run, config.seed))
    _, batches, mean, std, _ = train.training_batches(config)
    iterator = pipeline.iterate(batches)
    placed = sharding.batch_sharding(run.mesh)
    batches = [train.global_batch(next(iterator), placed) for _ in range(3)]
    iterator.close()
    return config, run, params, mean, std, batches


def test_unreached_parts_are_what_the_loss_does_not_reach(tiny_run):
    """optim.UNREACHED against the real gradient of the training loss at random init: exactly
    zero on every leaf it names and on no other. (Attention key biases pass only by rounding: a
    bias added to every key shifts a query's logits alike, and softmax ignores that.)"""
    config, run, params, mean, std, batches = tiny_run
    params = jax.device_put(params, run.param_shardings)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        loss_fn = train_step.make_loss_fn(run.model, run.mesh, config, mean, std)
        grads = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, batches[0])
    grads = flat(jax.device_get(grads))
    assert {n for n, g in grads.items() if not g.any()} == {n for n in grads if is_unreached(n)}
    for pattern in optim.UNREACHED:
        assert any(n.startswith(pattern + "/") for n in grads), pattern


def test_unreached_parts_are_unchanged_by_training_and_hold_no_state(tiny_run):
    """Three steps of the training step with the run's optimizer (state sharded by
    `state_shardings`): the unreached heads, kernels included, are bit-identical, every other
    leaf moved, and the optimizer state holds no array for them."""
    config, run, before, mean, std, batches = tiny_run
    opt = run_state.optimizer(config, run)
    params = jax.device_put(before, run.param_shardings)
    opt_state = opt.init(params)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = train_step.jit_train_step(run, opt, config, mean, std)
        for batch in batches:
            params, opt_state, _ = step(params, opt_state, batch)
    before, after = flat(before), flat(jax.device_get(params))
    for name in before:
        assert np.array_equal(before[name], after[name]) == is_unreached(name), name

    state = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(opt_state)}
    assert not [n for n in state if "['img']['MAPHead_0']" in n or "['txt']['head']" in n]
    # Adam's moments are split like their parameters.
    kernel = "['img']['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"
    moments = [v for n, v in state.items() if n.endswith(kernel)]
    assert len(moments) == 2
    want = run.param_shardings["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert all(m.sharding == want for m in moments) and not want.is_fully_replicated
