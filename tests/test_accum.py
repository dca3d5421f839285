"""Gradient accumulation (`optim.accum_steps=k`): the step over a global batch of B in k
micro-batches against the plain step over the same B, the independent reference (one
jax.value_and_grad of the loss over all B samples). The sigmoid loss scores every pair of the
batch, so only a step that keeps all B embeddings for the loss can agree: accumulating
micro-batch gradients (optax.MultiSteps, this code's earlier form) trains each sample against
its micro-batch's negatives only, and its loss and gradient differ from the reference's.

Also: the skip policy with k > 1 (exactly the non-finite steps skipped, resume bitwise exact),
and the one-line errors of an accum_steps the batch or the mesh cannot take."""
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

import tiny_run_config
from caip_jax import run_state, sharding, train, train_step
from caip_jax.checkpoint import Checkpoints
from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from test_faults import diverging_config, strict_json_lines
from test_train import final_params

BATCH = 32  # 8 devices x k = 4 micro-batches of one row each


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of `config.batch_size` valid inputs (train_step.abstract_batch's shapes),
    random so that no two samples are alike; a few hands absent."""
    rng = np.random.default_rng(seed)
    shapes = train_step.abstract_batch(config, sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
    batch = {}
    for name, s in shapes.items():
        if s.dtype == np.uint8:
            batch[name] = rng.integers(0, 256, s.shape, dtype=np.uint8)
        elif s.dtype == np.int16:
            batch[name] = rng.integers(-3000, 3000, s.shape).astype(np.int16)
        elif s.dtype == np.bool_:
            batch[name] = rng.random(s.shape) > 0.1
        elif name == "text":
            batch[name] = rng.integers(1, config.model.text.vocab_size, s.shape).astype(np.int32)
        elif name == "source_index":
            batch[name] = np.zeros(s.shape, np.int32)
        else:  # jitter factors, translation scale
            batch[name] = rng.uniform(0.8, 1.2, s.shape).astype(np.float32)
    return batch


def step_config(loss: str, devices: int, accum: int):
    config = tiny_run_config.get_config()
    config.batch_size, config.loss, config.optim.accum_steps = BATCH, loss, accum
    config.model.depth = config.model.action.depth = 1  # compile time: the blocks are alike
    config.mesh.update(data=2 if devices > 1 else 1, fsdp=-1)
    # b near log(B): negatives and positives both carry gradient; no clipping, and Adam's eps=1
    # so that the update follows the gradient's size, not only its sign.
    config.model.b_init = -3.0
    config.optim.update(warmup_steps=0, grad_clip_norm=None, eps=1.0, learning_rate=1e-2)
    return config


def run_step(config, devices: int, train_too: bool = False):
    """The value, top-1 and gradient of the step's `value_and_grad` (accumulated if
    optim.accum_steps > 1) and its compiled HLO; with `train_too`, instead the parameters and
    metrics after one jitted train step."""
    run = run_state.setup(config, jax.devices()[:devices])
    shape = (1, NUM_HANDS, NUM_KEYPOINTS, FEATURES_PER_KEYPOINT)
    mean, std = np.zeros(shape, np.float32), np.ones(shape, np.float32)
    params = run_state.initial_params(run, config.seed)
    batch = jax.device_put(random_batch(config), sharding.batch_sharding(run.mesh))
    opt = run_state.optimizer(config, run)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        if config.optim.accum_steps > 1:
            value_and_grad = train_step.make_accumulated_value_and_grad(run.model, run.mesh, config, mean, std)
        else:
            value_and_grad = jax.value_and_grad(train_step.make_loss_fn(run.model, run.mesh, config, mean, std), has_aux=True)
        if train_too:
            new_params, _, metrics = train_step.jit_train_step(run, opt, config, mean, std)(params, opt.init(params), batch)
            return dict(params=flat(new_params), metrics=jax.device_get(metrics))
        compiled = jax.jit(value_and_grad).lower(params, batch).compile()
        (value, top1), grads = compiled(params, batch)
        return dict(value=float(value), top1=float(top1), grads=flat(grads), hlo=compiled.as_text())


@pytest.fixture(scope="module")
def reference():
    """The plain step over the whole batch, dense loss on one device: (value and gradient), and
    the ring loss on 8 devices with one train step."""
    return dict(gradient=run_step(step_config("dense", 1, 1), 1), step=run_step(step_config("ring", 8, 1), 8, train_too=True))


def moved_between_devices(hlo: str) -> list[str]:
    """The all-to-all and all-gather ops of a compiled program that are not the model's own (its
    parameters gathered from their fsdp shards, its token-embedding lookup)."""
    collective = lambda line: " all-to-all(" in line or " all-gather(" in line
    return [line for line in hlo.splitlines() if collective(line) and "CAIP" not in line]


@pytest.mark.parametrize(
    "loss, devices, accum", [("ring", 1, 4), ("ring", 8, 2), ("dense", 8, 4)]
)
def test_accumulated_gradient_equals_the_plain_gradient_over_the_whole_batch(loss, devices, accum, reference):
    want, got = reference["gradient"], run_step(step_config(loss, devices, accum), devices)
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-6)
    assert got["top1"] == want["top1"]
    scale = max(np.abs(g).max() for g in want["grads"].values())
    assert np.abs(want["grads"]["b"]) > 1e-3 * scale and np.abs(want["grads"]["t"]) > 1e-3 * scale
    for name, g in want["grads"].items():
        # float32 rounding of sums taken in other orders: relative to the largest entry.
        np.testing.assert_allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6 * scale, err_msg=name)
    # Each device keeps its own rows: splitting the batch into micro-batches moves no data (the
    # dense loss gathers the embeddings by design).
    assert loss == "dense" or not moved_between_devices(got["hlo"])


def test_accumulated_train_step_updates_and_logs_as_the_plain_step(reference):
    """One jitted train step at k = 4 on 8 devices, ring loss: the same updated parameters, and
    the logged loss, top-1 over the whole batch and gradient norm."""
    want, got = reference["step"], run_step(step_config("ring", 8, 4), 8, train_too=True)
    for key in ("loss", "top1", "grad_norm", "temperature", "bias"):
        np.testing.assert_allclose(got["metrics"][key], want["metrics"][key], rtol=1e-5, err_msg=key)
    for name, p in want["params"].items():
        np.testing.assert_allclose(got["params"][name], p, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "batch, accum, mesh, message",
    [
        (16, 3, dict(data=2, fsdp=-1), r"^optim.accum_steps=3 does not divide batch_size=16 \(the global batch\): use e.g. optim.accum_steps=2, or batch_size=24$"),
        (16, 4, dict(data=2, fsdp=-1), r"^batch_size=16 / optim.accum_steps=4 = 4 samples per micro-batch do not split over the batch axes data x fsdp = 8 of config.mesh=\{.*\}: use e.g. optim.accum_steps=2, or batch_size=32$"),
    ],
)
def test_accum_steps_the_batch_or_mesh_cannot_take_is_named(batch, accum, mesh, message):
    config = tiny_run_config.get_config()
    config.batch_size, config.optim.accum_steps = batch, accum
    config.mesh.update(mesh)
    with pytest.raises(ValueError, match=message):
        run_state.setup(config)


def test_skip_policy_with_accumulation_skips_exactly_the_non_finite_steps_and_resumes_exactly(record_set, tmp_path):
    """k = 2 micro-batches a step: a step whose loss or gradient is non-finite leaves the
    parameters as they were, every other step moves them; the optimizer state holds no
    accumulator (so a checkpoint is always at a step boundary); a run resumed from step 3 ends
    bitwise equal to the straight run."""
    config = diverging_config(record_set, "skip")
    config.batch_size, config.optim.accum_steps = 16, 2
    config.model.depth = config.model.action.depth = 1  # compile time
    config.nonfinite.max_consecutive = config.total_steps
    workdir = str(tmp_path / "run")
    last = train.train(config, workdir)
    logged = {m["step"]: m for m in strict_json_lines(os.path.join(workdir, "metrics.jsonl"))}
    bad = [s for s, m in logged.items() if m["loss"] is None or m["grad_norm"] is None]
    assert bad and bad != list(logged), "the learning rate should have made some steps non-finite"
    assert last["skipped_updates"] == len(bad)
    checkpoints = Checkpoints(workdir)
    run = run_state.setup(config)
    abstract = run_state.abstract_params(run)
    params = {s: jax.device_get(checkpoints.restore(s, abstract)["params"]) for s in range(1, config.total_steps + 1)}
    state_paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(run_state.optimizer(config, run).abstract_state)]
    checkpoints.close()
    assert not [p for p in state_paths if "acc_grads" in p or "mini_step" in p]
    for step in range(2, config.total_steps + 1):
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[step - 1]), jax.tree.leaves(params[step])))
        assert same == (step in bad), step

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in range(4, config.total_steps + 1):
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
    again = train.train(config, resumed)
    assert again["skipped_updates"] == last["skipped_updates"]
    (step_a, a), (step_b, b) = final_params(config, workdir), final_params(config, resumed)
    assert step_a == step_b == config.total_steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    got = {m["step"]: m for m in strict_json_lines(os.path.join(resumed, "metrics.jsonl"))}
    assert [got[s]["loss"] for s in range(4, 7)] == [logged[s]["loss"] for s in range(4, 7)]
