"""Scanned towers (`model.scan`): the same model as the per-block one, parameters converted by
`caip_jax.models.layout`, and the conversions themselves."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

import tiny
from caip_jax.models import dummy_inputs, layout, model_from_config
from test_model import random_inputs

OUTPUTS = ("image_pooled", "patch_features", "image_map", "text_tokens", "text_pooled", "action_embedding",
           "stage1_attention", "stage2_attention")


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def tree(flat_params):
    return traverse_util.unflatten_dict(flat_params, sep="/")


def config_of(scan, remat="none"):
    config = tiny.tiny_model_config()
    config.scan, config.remat_policy = scan, remat
    return config


def abstract(config):
    model = model_from_config(config)
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config)))["params"])


@pytest.fixture(scope="module")
def per_block_params():
    """Parameters of the per-block tiny model, every leaf noisy (no two blocks alike, no
    LayerNorm at exactly 1 and 0), so that a block taken for another cannot hide."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), abstract(config_of(False)))


def test_stacked_parameters_are_the_scanned_models_tree(per_block_params):
    stacked = layout.stack(flat(per_block_params))
    wanted = flat(abstract(config_of(True)))
    assert {k: v.shape for k, v in stacked.items()} == {k: v.shape for k, v in wanted.items()}
    name = "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    for i in range(tiny.DEPTH):
        block = flat(per_block_params)[name.replace("encoderblock", f"encoderblock_{i}")]
        np.testing.assert_array_equal(stacked[name][i], block)


def outputs_and_gradients(config, params, batch, weights=None):
    """The model's outputs and the gradient of sum_k <weights[k], output k> (random weights by
    default), from one compiled forward and backward pass."""
    model = model_from_config(config)
    apply = lambda p: model.apply({"params": p}, **batch, return_attention=True)
    if weights is None:
        rng = np.random.default_rng(1)
        weights = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in jax.eval_shape(apply, params).items()}

    def loss(p):
        out = apply(p)
        return sum((out[k] * weights[k]).sum() for k in OUTPUTS), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads, weights


@pytest.fixture(scope="module")
def per_block_reference(per_block_params):
    batch = random_inputs(config_of(False))
    return batch, *outputs_and_gradients(config_of(False), per_block_params, batch)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_model_gives_the_per_block_outputs_and_gradients(per_block_params, per_block_reference, remat):
    """Every output of the three towers and the pooling, and the gradient of every parameter of
    a loss that reads them all, equal the per-block model's (without remat) to 1e-5; the
    gradients are unstacked to compare."""
    batch, out, grads, weights = per_block_reference
    scanned_params = tree(layout.stack(flat(per_block_params)))
    scanned_out, scanned_grads, _ = outputs_and_gradients(config_of(True, remat), scanned_params, batch, weights)
    for name in OUTPUTS:
        np.testing.assert_allclose(scanned_out[name], out[name], rtol=1e-5, atol=1e-5, err_msg=name)
    grads, scanned_grads = flat(grads), layout.unstack(flat(scanned_grads))
    assert scanned_grads.keys() == grads.keys()
    for name, g in grads.items():
        # t and b enter only the loss, not the forward pass.
        assert name in ("t", "b") or np.abs(g).max() > 0, f"{name}: a zero gradient proves nothing"
        np.testing.assert_allclose(scanned_grads[name], g, rtol=1e-5, atol=1e-5, err_msg=name)


def test_unstack_then_stack_is_the_identity(per_block_params):
    scanned = layout.stack(flat(per_block_params))
    assert layout.is_scanned(scanned) and not layout.is_scanned(flat(per_block_params))
    again = layout.stack(layout.unstack(scanned))
    assert again.keys() == scanned.keys()
    for name in scanned:
        np.testing.assert_array_equal(again[name], scanned[name])
    assert layout.to_layout(scanned, scanned=False).keys() == flat(per_block_params).keys()


def test_a_missing_block_is_refused_by_name(per_block_params):
    params = flat(per_block_params)
    del params["txt/Encoder_0/encoderblock_0/LayerNorm_1/bias"]
    with pytest.raises(ValueError, match=r"blocks missing: \['txt/Encoder_0/encoderblock_0/LayerNorm_1/bias'\]"):
        layout.stack(params)


def test_scanned_parameters_are_sharded_like_each_block():
    """The stacked axis is the logical 'layers', replicated; the other axes keep the block's
    logical names, so each layer is split over the mesh as it was per block."""
    from jax.sharding import Mesh, PartitionSpec

    from caip_jax import sharding

    config = config_of(True)
    model = model_from_config(config)
    specs = nn.get_partition_spec(jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config))))
    name = "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    assert flat(specs["params"])[name] == PartitionSpec("layers", "embed", "mlp")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.LOGICAL_AXIS_RULES)
    assert flat(shardings["params"])[name].spec == PartitionSpec(None, "fsdp", "tensor")
