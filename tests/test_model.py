"""CAIP model behaviour: outputs, masking, dtypes, rematerialisation, sharding annotations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh

import tiny
from caip_jax import sharding
from caip_jax.models import CAIP, dummy_inputs, layout, model_from_config
from caip_jax.models.caip import TextConditionedPool
from caip_jax.models.common import REMAT_POLICIES
from caip_jax.models.vit import ViT


def random_inputs(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = dummy_inputs(config, batch)
    text = rng.integers(1, config.text.vocab_size, shapes["text"].shape).astype(np.int32)
    text[0, 4:] = config.text.pad_id
    return dict(
        image=rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
        text=text,
        action=rng.normal(size=shapes["action"].shape).astype(np.float32),
        action_mask=rng.random(shapes["action_mask"].shape) > 0.2,
    )


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny.tiny_model_config()
    model = model_from_config(config)
    variables = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(config))
    return config, model, variables


def test_outputs_have_the_papers_names_and_shapes(tiny_model):
    config, model, variables = tiny_model
    out = jax.jit(model.apply, static_argnames="return_attention")(
        variables, **random_inputs(config), return_attention=True
    )
    n, d, length, h = (tiny.IMAGE_SIZE // tiny.PATCH) ** 2, tiny.WIDTH, tiny.TEXT_LEN, tiny.HEADS
    assert {k: v.shape for k, v in out.items()} == {
        "image_pooled": (3, d),
        "patch_features": (3, n, d),
        "text_tokens": (3, length, d),
        "text_pooled": (3, d),
        "image_map": (3, d),
        "action_embedding": (3, d),
        "stage1_attention": (3, h, length, n),
        "stage2_attention": (3, h, length),
    }
    params = nn.unbox(variables["params"])
    np.testing.assert_allclose(params["t"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(params["b"], -10.0)


def test_pooling_ignores_padded_text_positions():
    """Whatever the per-token features at padded positions, the pooled image is the same and
    the probe gives them exactly zero weight."""
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 16, tiny.WIDTH)).astype(np.float32)
    text_tokens = rng.normal(size=(2, 8, tiny.WIDTH)).astype(np.float32)
    mask = np.ones((2, 8), bool)
    mask[0, 3:] = mask[1, 6:] = False
    pool = TextConditionedPool(tiny.HEADS, tiny.MLP_DIM)
    variables = pool.init(jax.random.key(1), patches, text_tokens, mask)
    pooled, _, stage2 = pool.apply(variables, patches, text_tokens, mask)

    changed = np.where(mask[..., None], text_tokens, 100 * rng.normal(size=text_tokens.shape))
    pooled_changed, _, _ = pool.apply(variables, patches, changed.astype(np.float32), mask)
    np.testing.assert_array_equal(pooled, pooled_changed)
    assert np.all(np.asarray(stage2)[np.broadcast_to(~mask[:, None], stage2.shape)] == 0)
    np.testing.assert_allclose(np.asarray(stage2).sum(-1), 1.0, rtol=1e-6)
    # The mask matters: without it the same change moves the pooled image.
    unmasked = np.ones_like(mask)
    assert not np.allclose(
        pool.apply(variables, patches, text_tokens, unmasked)[0],
        pool.apply(variables, patches, changed.astype(np.float32), unmasked)[0],
    )


def test_model_masks_the_pad_id_in_pooling(tiny_model):
    config, model, variables = tiny_model
    inputs = random_inputs(config)
    stage2 = model.apply(variables, **inputs, return_attention=True)["stage2_attention"]
    is_pad = np.broadcast_to((inputs["text"] == config.text.pad_id)[:, None], stage2.shape)
    assert is_pad.any() and np.all(np.asarray(stage2)[is_pad] == 0)
    assert np.all(np.asarray(stage2)[~is_pad] > 0)


def test_action_tower_ignores_values_of_absent_hands(tiny_model):
    config, model, variables = tiny_model
    inputs = random_inputs(config)
    mask = inputs["action_mask"]
    noisy = np.where(mask[..., None, None], inputs["action"], 1e3)
    embed = lambda a, m: model.apply(variables, a, m, method=CAIP.encode_action)
    np.testing.assert_allclose(embed(inputs["action"], mask), embed(noisy, mask), rtol=1e-6, atol=1e-6)
    # The mask itself is an input: marking a hand absent changes the embedding.
    assert not np.allclose(embed(inputs["action"], mask), embed(inputs["action"], np.ones_like(mask)))


def test_bfloat16_compute_keeps_float32_parameters():
    config = tiny.tiny_model_config()
    config.dtype = "bfloat16"
    model = model_from_config(config)
    variables = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(config))
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype("float32")}
    out = jax.jit(model.apply)(variables, **random_inputs(config))
    assert {v.dtype for v in out.values()} == {jnp.dtype("bfloat16")}
    reference = jax.jit(model_from_config(tiny.tiny_model_config()).apply)(variables, **random_inputs(config))
    np.testing.assert_allclose(
        np.asarray(out["image_pooled"], np.float32), reference["image_pooled"], atol=0.1, rtol=0.1
    )


@pytest.fixture(scope="module")
def remat_runs():
    """(scan, remat policy) -> XLA's analysis of the compiled forward + backward of the image
    tower (temp bytes, FLOPs) and its gradients, from the same parameters in either layout."""
    vit = lambda scan, policy: ViT(tiny.WIDTH, tiny.DEPTH, tiny.MLP_DIM, tiny.HEADS, tiny.PATCH, remat_policy=policy, scan=scan)
    image = np.random.default_rng(0).uniform(-1, 1, (8, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3)).astype(np.float32)
    params = nn.unbox(vit(False, "none").init(jax.random.key(0), image))["params"]
    runs = {}
    for scan in (False, True):
        tree = traverse_util.unflatten_dict(layout.to_layout(traverse_util.flatten_dict(params, sep="/"), scan), sep="/")
        for policy in REMAT_POLICIES:
            model = vit(scan, policy)
            loss = lambda p: jnp.sum(model.apply({"params": p}, image)[1] ** 2)
            compiled = jax.jit(jax.grad(loss)).lower(tree).compile()
            grads = traverse_util.flatten_dict(compiled(tree), sep="/")
            runs[scan, policy] = dict(
                temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                flops=compiled.cost_analysis()["flops"],
                grads=layout.unstack(grads),
            )
    return runs


@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_recomputes_and_keeps_the_gradients(remat_runs, scan, policy):
    run, reference = remat_runs[scan, policy], remat_runs[False, "none"]
    assert run["flops"] > remat_runs[scan, "none"]["flops"], "no recomputation in the compiled program"
    for name, g in reference["grads"].items():
        np.testing.assert_allclose(run["grads"][name], g, rtol=1e-5, atol=1e-6, err_msg=name)


def test_remat_under_scan_lowers_temp_memory(remat_runs):
    """Temp bytes of the compiled forward + backward fall with each policy that saves less:
    none keeps every activation of every block, dots the matmul outputs, dots_no_batch only
    those without batch dimensions (not the attention logits), full only each block's input.

    (Per block, XLA's CPU scheduler runs each recomputation as soon as its inputs exist, not
    when the backward pass needs it, so the compiled temp bytes on CPU stay those of no remat:
    the scanned form is where a CPU shows the saving.)"""
    temp = {policy: remat_runs[True, policy]["temp_bytes"] for policy in REMAT_POLICIES}
    assert temp["full"] < temp["dots_no_batch"] < temp["dots"] < temp["none"], temp


def test_every_parameter_has_logical_axes_the_rules_know(tiny_model):
    _, _, variables = tiny_model
    specs = nn.get_partition_spec(variables)
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    for path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ):
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        names = [n for n in spec if n is not None]
        assert set(names) <= known, (path, spec)
        assert len(names) == len(set(names)), (path, spec)
    # And they resolve on a real mesh: the width is split over fsdp, MLP and heads over tensor.
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.LOGICAL_AXIS_RULES)
    kernel = shardings["params"]["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
