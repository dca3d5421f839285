"""One setup path: the run over given devices, the abstract batch the step is lowered with, and
the loss the config selects."""
import flax.linen as nn
import jax
import numpy as np
import pytest

import tiny_run_config
from caip_jax import run_state, sharding, train, train_step
from caip_jax.data import pipeline


def tiny_config(record_set=("", ""), **changes):
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    config.update(changes)
    return config


def first_batch(config):
    """This process's first training batch (numpy) and the action mean and std."""
    _, batches, mean, std = train.training_batches(config)[:4]
    iterator = pipeline.iterate(batches, workers=0)
    local = next(iterator)
    iterator.close()
    return local, mean, std


def test_setup_builds_the_mesh_over_the_given_devices():
    devices = jax.devices()[4:8]
    run = run_state.setup(tiny_config(), devices)
    assert sorted(d.id for d in run.mesh.devices.flat) == [d.id for d in devices]
    assert dict(run.mesh.shape) == dict(data=2, fsdp=2, tensor=1)


def test_abstract_batch_is_what_the_pipeline_makes(record_set):
    config = tiny_config(record_set)
    real, _, _ = first_batch(config)
    run = run_state.setup(config)
    abstract = train_step.abstract_batch(config, run.mesh)
    assert set(abstract) == set(train_step.BATCH_KEYS)
    for key in train_step.BATCH_KEYS:
        assert (abstract[key].shape, abstract[key].dtype) == (real[key].shape, real[key].dtype), key
        assert abstract[key].sharding == sharding.batch_sharding(run.mesh)


def test_unknown_loss_is_named():
    config = tiny_config(loss="rng")
    run = run_state.setup(config)
    with pytest.raises(ValueError, match=r"config.loss='rng' is not one of \('ring', 'dense'\)"):
        train_step.make_train_step(run.model, None, run.mesh, config, None, None)


def step_outputs(config, run, opt, params, opt_state, batch, mean, std):
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = train_step.jit_train_step(run, opt, config, mean, std)
        lowered = step.lower(params, opt_state, batch)
        new_params, _, metrics = lowered.compile()(params, opt_state, batch)
    return lowered.as_text(), jax.device_get(new_params), jax.device_get(metrics)


def test_ring_and_dense_loss_give_the_same_step(record_set):
    """config.loss selects the form: only the ring passes embeddings between devices, and both
    give the same loss, top1 and updated parameters."""
    config = tiny_config(record_set)
    local, mean, std = first_batch(config)
    run = run_state.setup(config)
    outputs = {}
    for name in ("ring", "dense"):
        config.loss = name
        opt = run_state.optimizer(config, run)
        params = run_state.initial_params(run, seed=0)
        batch = train.global_batch(local, sharding.batch_sharding(run.mesh))
        outputs[name] = step_outputs(config, run, opt, params, opt.init(params), batch, mean, std)
    (ring_text, ring_params, ring_metrics), (dense_text, dense_params, dense_metrics) = outputs["ring"], outputs["dense"]
    assert "collective_permute" in ring_text and "collective_permute" not in dense_text
    for key in ("loss", "top1", "grad_norm"):
        np.testing.assert_allclose(ring_metrics[key], dense_metrics[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ring_params, dense_params)
