"""Model configs: full-size parameter counts against Hugging Face, and errors that name the field."""
import pytest
import torch
import transformers

import tiny
from caip_jax import config as caip_config
from caip_jax.models import model_from_config, summary, validate
from caip_jax.models.vit import decode_variant


@pytest.mark.parametrize("variant", ["B/16", "L/16", "So400m/16"])
def test_full_size_towers_count_like_hf_siglip(variant):
    """img + txt + t + b have exactly the parameters of HF's SiglipModel of the same size (the
    layout of the SigLIP 2 releases at 256 px), built on the meta device: nothing is allocated."""
    config = caip_config.model_config(variant)
    counts = summary.parameter_counts(config)
    size = decode_variant(variant)
    hf_config = tiny.hf_siglip_config(
        hidden_size=size["width"],
        intermediate_size=size["mlp_dim"],
        num_hidden_layers=size["depth"],
        num_attention_heads=size["num_heads"],
    )
    hf_config.vision_config.update(dict(image_size=256, patch_size=16))
    hf_config.text_config.update(dict(vocab_size=256_000, max_position_embeddings=64))
    with torch.device("meta"):
        hf = transformers.SiglipModel(hf_config)
    ours = counts["img"] + counts["txt"] + counts["t"] + counts["b"]
    assert ours == sum(p.numel() for p in hf.parameters())
    pos_embedding = summary.abstract_params(config)["img"]["pos_embedding"]
    assert pos_embedding.shape == (1, 256, size["width"])


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: setattr(c, "image_size", 30), "model.image_size=30"),
        (lambda c: setattr(c, "num_heads", 5), "model.width=32 is not divisible by model.num_heads=5"),
        (lambda c: c.action.update(width=25), "model.action.width=25"),
        (lambda c: setattr(c, "variant", "XL/16"), "model.variant='XL/16'"),
        (lambda c: setattr(c, "variant", "L16"), "model.variant='L16'"),
        (lambda c: setattr(c, "dtype", "float16"), "model.dtype='float16'"),
        (lambda c: setattr(c, "remat_policy", "some"), "model.remat_policy='some'"),
        (lambda c: c.pool.update(num_heads=3), "model.pool.num_heads=3"),
        (lambda c: c.action.update(horizon=0), "model.action.horizon=0"),
    ],
)
def test_config_errors_name_the_field(change, field):
    config = tiny.tiny_model_config()
    change(config)
    with pytest.raises(ValueError) as error:
        model_from_config(config)
    assert field in str(error.value)


def test_paper_config_is_valid():
    config = caip_config.model_config("L/16")
    assert validate(config) == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16)
    assert (config.image_size // 16) ** 2 == 256 and config.text.length == 64 and config.action.horizon == 64
