"""The image and text towers and the pooling against Hugging Face / PyTorch references."""
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

import tiny
from caip_jax.init import siglip2
from caip_jax.models import model_from_config
from caip_jax.models.caip import TextConditionedPool
from caip_jax.models.summary import abstract_params

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["per_block", "scanned"])
def hf_and_caip(request):
    """A randomised tiny HF SiglipModel and the CAIP params that hold its weights, with the
    towers' blocks per block or scanned (`model.scan`)."""
    hf = tiny.random_hf_siglip(tiny.hf_siglip_config())
    config = tiny.tiny_model_config()
    config.scan = request.param
    rng = np.random.default_rng(0)  # the action tower and the pooling: random, of their shapes
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract_params(config))
    flat = siglip2.from_hf_state_dict(tiny.state_dict_numpy(hf), num_heads=tiny.HEADS)
    return hf, model_from_config(config), siglip2.replace_towers(params, flat)


def test_towers_match_hf_siglip(hf_and_caip):
    hf, model, params = hf_and_caip
    tiny.assert_towers_match_hf(hf, model, params)
    np.testing.assert_allclose(params["t"], hf.logit_scale.item(), rtol=1e-6)
    np.testing.assert_allclose(params["b"], hf.logit_bias.item(), rtol=1e-6)


def test_pooling_matches_torch_attention_pooling():
    """Stage 1 is HF's MAP head structure with text tokens as queries; stage 2 is that structure
    with its probe, keys at padded text positions masked (torch's key_padding_mask)."""
    vision_config = tiny.hf_siglip_config().vision_config
    heads = [SiglipMultiheadAttentionPoolingHead(vision_config) for _ in range(2)]
    for seed, head in enumerate(heads):
        tiny.randomize_(head, seed=seed + 1)
    flat = {}
    for head, name in zip(heads, ("CrossAttentionPool_0", "MAPHead_0")):
        state = {f"vision_model.head.{k}": v for k, v in tiny.state_dict_numpy(head).items()}
        for key, value in siglip2.from_hf_state_dict(state, tiny.HEADS).items():
            if name == "MAPHead_0" or not key.endswith("probe"):
                flat[key.replace("img/MAPHead_0/", f"{name}/")] = value
    params = traverse_util.unflatten_dict(flat, sep="/")

    rng = np.random.default_rng(1)
    patches = rng.normal(size=(2, 16, tiny.WIDTH)).astype(np.float32)
    text_tokens = rng.normal(size=(2, 6, tiny.WIDTH)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    pool = TextConditionedPool(tiny.HEADS, tiny.MLP_DIM)
    pooled, stage1, stage2 = pool.apply({"params": params}, patches, text_tokens, text_mask)

    def torch_pool(head, queries, tokens, ignore=None):
        x, w = head.attention(
            queries, tokens, tokens, key_padding_mask=ignore, average_attn_weights=False
        )
        return x + head.mlp(head.layernorm(x)), w

    with torch.no_grad():
        per_token, w1 = torch_pool(heads[0], torch.from_numpy(text_tokens), torch.from_numpy(patches))
        probe = heads[1].probe.expand(2, 1, -1)
        ref, w2 = torch_pool(heads[1], probe, per_token, ignore=torch.from_numpy(~text_mask))
    np.testing.assert_allclose(pooled, ref[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(stage1, w1.numpy(), **TOL)
    np.testing.assert_allclose(stage2, w2[:, :, 0].numpy(), **TOL)


def test_import_refuses_unknown_and_missing_tensors(hf_and_caip):
    hf, _, params = hf_and_caip
    state = tiny.state_dict_numpy(hf)
    with pytest.raises(ValueError, match="vision_model.extra.weight"):
        siglip2.from_hf_state_dict({**state, "vision_model.extra.weight": np.zeros(3)}, tiny.HEADS)
    flat = siglip2.from_hf_state_dict(state, tiny.HEADS)
    del flat["txt/head/bias"]
    with pytest.raises(ValueError, match="missing from the checkpoint: \\['txt/head/bias'\\]"):
        siglip2.replace_towers(params, flat)
    flat = siglip2.from_hf_state_dict(state, tiny.HEADS)
    flat["img/pos_embedding"] = np.zeros((1, 4, tiny.WIDTH), np.float32)
    with pytest.raises(ValueError, match="img/pos_embedding: checkpoint \\(1, 4, 32\\)"):
        siglip2.replace_towers(params, flat)
