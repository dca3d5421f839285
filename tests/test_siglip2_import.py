"""Importing SigLIP 2 checkpoints (Hugging Face directories, big_vision .npz in either layout)
into CAIP, per block or scanned."""
import math

import jax
import numpy as np
import pytest
import torch

import tiny
import tiny_run_config
from caip_jax import run_state
from caip_jax.init import siglip2
from caip_jax.models import model_from_config
from caip_jax.models.summary import abstract_params


@pytest.fixture(scope="module", params=[False, True], ids=["per_block", "scanned"])
def caip(request):
    """The tiny CAIP model, its blocks per block or scanned (`model.scan`), and random params of
    its shapes (from shapes alone: compiling `model.init` would take most of this file's time)."""
    config = tiny.tiny_model_config()
    config.scan = request.param
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract_params(config))
    return model_from_config(config), params


def save_hf(directory, seed=0, image_size=tiny.IMAGE_SIZE, text_length=tiny.TEXT_LEN, **tower):
    """A random tiny `SiglipModel` saved with save_pretrained into `directory`; returns it."""
    config = tiny.hf_siglip_config(**tower)
    config.vision_config.image_size = image_size
    config.text_config.max_position_embeddings = text_length
    hf = tiny.random_hf_siglip(config, seed)
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("siglip_hf")
    return save_hf(directory), str(directory)


# --- big_vision's layout, written from the torch modules (independently of siglip2.py) ---


def _bv(tensor):
    return tensor.detach().numpy().copy()


def _bv_attention(q, k, v, out, heads):
    """Torch projections (weight [out, in], bias) -> big_vision's query/key/value [D, H, K],
    bias [H, K], out [H, K, D]."""
    arrays = {}
    for name, (weight, bias) in zip(("query", "key", "value"), (q, k, v)):
        arrays[f"{name}/kernel"] = _bv(weight).T.reshape(weight.shape[1], heads, -1)
        arrays[f"{name}/bias"] = _bv(bias).reshape(heads, -1)
    weight, bias = out
    arrays["out/kernel"] = _bv(weight).T.reshape(heads, -1, weight.shape[0])
    arrays["out/bias"] = _bv(bias)
    return {f"MultiHeadDotProductAttention_0/{k}": v for k, v in arrays.items()}


def _bv_norm(name, norm):
    return {f"{name}/scale": _bv(norm.weight), f"{name}/bias": _bv(norm.bias)}


def _bv_mlp(mlp):
    return {
        "MlpBlock_0/Dense_0/kernel": _bv(mlp.fc1.weight).T,
        "MlpBlock_0/Dense_0/bias": _bv(mlp.fc1.bias),
        "MlpBlock_0/Dense_1/kernel": _bv(mlp.fc2.weight).T,
        "MlpBlock_0/Dense_1/bias": _bv(mlp.fc2.bias),
    }


def _bv_block(layer, heads):
    attn = layer.self_attn
    projections = [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)]
    return {
        **_bv_norm("LayerNorm_0", layer.layer_norm1),
        **_bv_attention(*projections, heads=heads),
        **_bv_norm("LayerNorm_1", layer.layer_norm2),
        **_bv_mlp(layer.mlp),
    }


def big_vision_arrays(hf, scanned=False):
    """`hf`'s weights under big_vision's npz keys ('params/img/...'), blocks scanned or not."""
    heads = hf.config.vision_config.num_attention_heads
    vision, text, head = hf.vision_model, hf.text_model, hf.vision_model.head
    weights, biases = (torch.chunk(t, 3) for t in (head.attention.in_proj_weight, head.attention.in_proj_bias))
    arrays = {
        "img/embedding/kernel": _bv(vision.embeddings.patch_embedding.weight).transpose(2, 3, 1, 0),
        "img/embedding/bias": _bv(vision.embeddings.patch_embedding.bias),
        "img/pos_embedding": _bv(vision.embeddings.position_embedding.weight)[None],
        **_bv_norm("img/Transformer/encoder_norm", vision.post_layernorm),
        "img/MAPHead_0/probe": _bv(head.probe),
        **{
            f"img/MAPHead_0/{name}": value
            for name, value in {
                **_bv_attention(
                    *zip(weights, biases), (head.attention.out_proj.weight, head.attention.out_proj.bias), heads=heads
                ),
                **_bv_norm("LayerNorm_0", head.layernorm),
                **_bv_mlp(head.mlp),
            }.items()
        },
        "txt/Embed_0/embedding": _bv(text.embeddings.token_embedding.weight),
        "txt/pos_embedding": _bv(text.embeddings.position_embedding.weight)[None],
        **_bv_norm("txt/Encoder_0/encoder_norm", text.final_layer_norm),
        "txt/head/kernel": _bv(text.head.weight).T,
        "txt/head/bias": _bv(text.head.bias),
        "t": _bv(hf.logit_scale),  # shape (1,), as big_vision stores it
        "b": _bv(hf.logit_bias),
    }
    for prefix, layers in (("img/Transformer", vision.encoder.layers), ("txt/Encoder_0", text.encoder.layers)):
        blocks = [_bv_block(layer, heads) for layer in layers]
        for name in blocks[0]:
            if scanned:
                arrays[f"{prefix}/encoderblock/{name}"] = np.stack([block[name] for block in blocks])
            else:
                arrays.update({f"{prefix}/encoderblock_{i}/{name}": block[name] for i, block in enumerate(blocks)})
    return {f"params/{k}": v for k, v in arrays.items()}


def save_npz(path, arrays):
    np.savez(path, **arrays)
    return str(path)


# --- tests ---


def test_hf_directory_gives_hf_features(hf_dir, caip):
    hf, directory = hf_dir
    model, init = caip
    params = siglip2.init_from_siglip2(init, directory)
    tiny.assert_towers_match_hf(hf, model, params)
    for part in ("act", "pool", "t", "b"):
        jax.tree.map(np.testing.assert_array_equal, params[part], init[part])


def test_loss_scalars_taken_when_asked_for(hf_dir, caip):
    hf, directory = hf_dir
    _, init = caip
    params = siglip2.init_from_siglip2(init, directory, load_loss_scalars=True)
    np.testing.assert_allclose(params["t"], hf.logit_scale.item(), rtol=1e-6)
    np.testing.assert_allclose(params["b"], hf.logit_bias.item(), rtol=1e-6)


def test_a_run_starts_t_and_b_at_the_papers_values_unless_configured(hf_dir):
    """Step 0 with SigLIP 2's towers: t = log 10 and b = -10, the SigLIP paper's start for a new
    pairing (model.t_init, model.b_init); SigLIP 2's own, learned for image-text pairs, only
    with init.siglip2_logit_scalars."""
    hf, directory = hf_dir
    hf_t, hf_b = hf.logit_scale.item(), hf.logit_bias.item()
    assert abs(hf_t - math.log(10)) > 0.1 and abs(hf_b + 10) > 0.1, "the reference must differ from the paper's start"
    config = tiny_run_config.get_config()
    config.model.text.vocab_size = tiny.VOCAB  # the HF model's
    config.init.siglip2 = directory
    config.mesh.update(data=1, fsdp=1)
    run = run_state.setup(config, jax.devices()[:1])
    for logit_scalars, expected in ((False, (math.log(10), -10.0)), (True, (hf_t, hf_b))):
        config.init.siglip2_logit_scalars = logit_scalars
        params = run_state.initial_params(run, config.seed, config.init.siglip2, config.init.siglip2_logit_scalars)
        np.testing.assert_allclose([params["t"], params["b"]], expected, rtol=1e-6, err_msg=str(logit_scalars))
        np.testing.assert_array_equal(params["txt"]["head"]["bias"], hf.text_model.head.bias.detach().numpy())


def test_sharded_hf_directory_loads_like_one_file(hf_dir, tmp_path):
    hf, directory = hf_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded, single = siglip2.load_siglip2(str(tmp_path)), siglip2.load_siglip2(directory)
    assert sharded.keys() == single.keys()
    for name in single:
        np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)


@pytest.mark.parametrize("scanned", [False, True], ids=["per_block", "scanned"])
def test_big_vision_npz_gives_the_hf_params(hf_dir, tmp_path, scanned, caip):
    """Either npz layout into either model layout: the very parameters of the HF directory."""
    hf, directory = hf_dir
    _, init = caip
    arrays = big_vision_arrays(hf, scanned)
    # A training checkpoint's optimizer state is not weights: skipped, not refused.
    arrays["opt/mu/img/embedding/kernel"] = np.zeros(3, np.float32)
    npz = save_npz(tmp_path / "siglip2.npz", arrays)
    from_npz, from_hf = siglip2.load_siglip2(npz), siglip2.load_siglip2(directory)
    assert sorted(from_npz) == sorted(from_hf)
    for name in from_hf:
        np.testing.assert_array_equal(from_npz[name], from_hf[name], err_msg=name)
    params_npz, params_hf = (siglip2.init_from_siglip2(init, path, load_loss_scalars=True) for path in (npz, directory))
    jax.tree.map(np.testing.assert_array_equal, params_npz, params_hf)


def test_smaller_grid_is_resized_bilinearly_with_a_warning(tmp_path, caip):
    """A 2x2-patch checkpoint (16 px) into the 4x4-patch config (32 px): positions are
    interpolated as torch's bilinear interpolate with align_corners=True."""
    _, init = caip
    hf = save_hf(tmp_path, image_size=16)
    with pytest.warns(UserWarning, match="resized the checkpoint's 2x2 patch grid to the model's 4x4"):
        params = siglip2.init_from_siglip2(init, str(tmp_path))
    grid = hf.vision_model.embeddings.position_embedding.weight.detach()  # [4, D]
    grid = grid.T.reshape(1, tiny.WIDTH, 2, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=True)
    expected = expected.reshape(tiny.WIDTH, 16).T[None].numpy()
    np.testing.assert_allclose(params["img"]["pos_embedding"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(params["img"]["pos_embedding"][0, [0, 3, 12, 15]], grid.reshape(tiny.WIDTH, 4).T)
    np.testing.assert_array_equal(
        params["img"]["embedding"]["kernel"],
        hf.vision_model.embeddings.patch_embedding.weight.detach().numpy().transpose(2, 3, 1, 0),
    )


def test_another_width_is_refused_by_tensor_name(tmp_path, caip):
    _, init = caip
    save_hf(tmp_path, hidden_size=48)
    with pytest.raises(ValueError, match=r"img/embedding/kernel: checkpoint \(8, 8, 3, 48\) vs model \(8, 8, 3, 32\)"):
        siglip2.init_from_siglip2(init, str(tmp_path))


def test_another_text_length_is_refused(tmp_path, caip):
    _, init = caip
    save_hf(tmp_path, text_length=8)
    with pytest.raises(ValueError, match="txt/pos_embedding: the checkpoint has 8 text positions, the model 16"):
        siglip2.init_from_siglip2(init, str(tmp_path))


def test_missing_and_unknown_npz_tensors_are_refused_by_name(hf_dir, tmp_path, caip):
    hf, _ = hf_dir
    _, init = caip
    arrays = big_vision_arrays(hf)
    del arrays["params/txt/head/bias"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['txt/head/bias'\]"):
        siglip2.init_from_siglip2(init, save_npz(tmp_path / "missing.npz", arrays))
    arrays = big_vision_arrays(hf)
    del arrays["params/img/Transformer/encoderblock_0/LayerNorm_0/scale"]
    with pytest.raises(ValueError, match=r"\['img/Transformer/encoderblock_0/LayerNorm_0/scale'\]"):
        siglip2.init_from_siglip2(init, save_npz(tmp_path / "missing_block.npz", arrays))
    arrays = {**big_vision_arrays(hf), "params/head/kernel": np.zeros((32, 10), np.float32)}
    with pytest.raises(ValueError, match=r"no place for: \['head/kernel'\]"):
        siglip2.load_npz(save_npz(tmp_path / "classifier.npz", arrays))


def test_unknown_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a big_vision .npz file nor a Hugging Face directory"):
        siglip2.load_siglip2(str(tmp_path))
