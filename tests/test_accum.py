"""Gradient accumulation in the training loop: caip_jax.train.train with k micro-batches of B
samples per step against the same run with one batch of k * B.

The two are not equal in general: the sigmoid loss of k * B samples also scores the negative
pairs across micro-batches, so each sample meets k * B - 1 negatives there and B - 1 in a
micro-batch. With b = -200 every negative pair's term and gradient are exactly 0 in float32
(log sigmoid(200 +- 10) rounds to 0), and the loss is the mean over samples of the positive
pairs' terms; then k accumulated micro-batches must train as the large batch does. Both runs
see the same samples: the sample stream does not depend on the batch size.
"""
import jax
import numpy as np
import pytest

from caip_jax import train
from test_train import final_params, metrics, run_config

MICRO_BATCH, ACCUM, STEPS = 8, 2, 2


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def train_run(record_set, workdir: str, batch: int, accum: int, cache: str) -> tuple[dict, dict]:
    """STEPS optimizer steps of `accum` micro-batches of `batch` -> (metrics by step, final
    parameters by path). `cache`: the compilation cache (the runs share their initialisation)."""
    config = run_config(record_set)
    config.compilation_cache = cache
    config.batch_size, config.optim.accum_steps, config.total_steps = batch, accum, STEPS
    config.model.b_init = -200.0
    # No clipping, and eps = 1 (Adam's step ~ g / (|g| + 1)): the update depends on the
    # gradient's scale, so a sum of micro-gradients would not pass for their mean, and the
    # rounding noise of gradients that are zero in exact arithmetic (attention key biases)
    # stays noise-sized instead of becoming a step of size lr.
    config.optim.update(warmup_steps=0, grad_clip_norm=None, eps=1.0, learning_rate=1e-2)
    train.train(config, workdir)
    step, params = final_params(config, workdir)
    assert step == STEPS
    return metrics(workdir), flat(params)


@pytest.fixture(scope="module")
def runs(record_set, tmp_path_factory):
    """{"accumulated", "large"}: (metrics by step, final parameters) of the two runs."""
    workdir, cache = lambda name: str(tmp_path_factory.mktemp(name)), str(tmp_path_factory.mktemp("cache"))
    return dict(
        accumulated=train_run(record_set, workdir("accumulated"), MICRO_BATCH, ACCUM, cache),
        large=train_run(record_set, workdir("large"), ACCUM * MICRO_BATCH, 1, cache),
    )


def test_accumulated_micro_batches_train_like_one_large_batch(runs):
    (got_metrics, got), (want_metrics, want) = runs["accumulated"], runs["large"]
    for step in range(1, STEPS + 1):
        assert got_metrics[step]["seen_train"] == want_metrics[step]["seen_train"] == step * ACCUM * MICRO_BATCH
        assert got_metrics[step]["learning_rate"] == want_metrics[step]["learning_rate"], step
        for key in ("temperature", "bias"):
            np.testing.assert_allclose(got_metrics[step][key], want_metrics[step][key], rtol=1e-6, err_msg=key)
    assert got_metrics[1]["bias"] != -200.0  # the runs trained: a test that can fail
    # Parameters near 1 are held to ~1e-7 in float32; the runs move them by up to 1e-2 (rounding
    # differences of the two reductions stay below 3e-8).
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_accumulated_steps_log_the_large_batch_loss(runs):
    """An optimizer step's loss is the mean over its micro-batches, its gradient norm that of the
    mean gradient (the one clipped and applied): here both equal the large batch's. (Not the
    in-batch top-1: it ranks B candidates in a micro-batch and k * B in the large batch.)"""
    got, want = runs["accumulated"][0], runs["large"][0]
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=f"{key} at step {step}")
