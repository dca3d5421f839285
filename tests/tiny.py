"""Tiny reference models built inside the tests (nothing is downloaded), and the tiny config."""
import numpy as np
import torch
import transformers

# The tiny model's sizes and config live apart, without torch: every process a test starts
# imports them (through tiny_run_config), and torch with transformers' SigLIP costs seconds.
from tiny_config import DEPTH, HEADS, IMAGE_SIZE, MLP_DIM, PATCH, TEXT_LEN, VOCAB, WIDTH, tiny_model_config  # noqa: F401


def hf_siglip_config(**tower):
    """A `SiglipConfig` whose towers have the given size (default: the tiny config's)."""
    size = dict(
        hidden_size=WIDTH, intermediate_size=MLP_DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS
    )
    size.update(tower)
    vision = dict(size, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = dict(size, vocab_size=VOCAB, max_position_embeddings=TEXT_LEN)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.3):
    """Overwrites every parameter with N(0, scale^2) noise (LayerNorm scales around 1), so that
    a bias, scale or transpose mapped wrongly cannot hide behind a default initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def random_hf_siglip(config: transformers.SiglipConfig, seed: int = 0) -> transformers.SiglipModel:
    """A `SiglipModel` of `config` in eval mode with every parameter randomised (`randomize_`)."""
    hf = transformers.SiglipModel(config).eval()
    randomize_(hf, seed)
    return hf


def assert_towers_match_hf(hf: transformers.SiglipModel, model, params, seed: int = 0, tol: float = 1e-5):
    """CAIP's image and text tower outputs under `params` equal `hf`'s on random inputs: patch
    tokens, MAP-pooled image, text tokens (some padded, unmasked as in SigLIP 2), pooled text."""
    from caip_jax.models import CAIP

    rng = np.random.default_rng(seed)
    size = hf.config.vision_config.image_size
    image = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    text = rng.integers(1, hf.config.text_config.vocab_size, (3, hf.config.text_config.max_position_embeddings))
    text[1, 5:] = 0
    ours = model.apply({"params": params}, image, text.astype(np.int32), method=CAIP.encode_image_text)
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2)))
        text_out = hf.text_model(input_ids=torch.from_numpy(text).long())
    for name, reference in (
        ("patch_features", vision.last_hidden_state),
        ("image_map", vision.pooler_output),
        ("text_tokens", text_out.last_hidden_state),
        ("text_pooled", text_out.pooler_output),
    ):
        np.testing.assert_allclose(np.asarray(ours[name]), reference.numpy(), rtol=tol, atol=tol, err_msg=name)
        assert np.abs(reference.numpy()).max() > 0.1, f"{name}: a degenerate reference proves nothing"
