"""Baseline saliency (caip-saliency --encoder hf:PATH) on tiny random Hugging Face models built
here: SigLIP's MAP-head attention equals a brute-force recomputation of the probe's softmax
from the model's own hidden states and projection weights; DINOv2's map equals the first
eigenvector of each image's patch covariance (numpy's eigh, not the SVD the module uses);
the frames are the model's own processor's; one contact sheet holds CAIP and the baselines."""
import numpy as np
import pytest
import tiny
import torch
import transformers
from PIL import Image

from caip_jax.evaluate import baseline_saliency, saliency

SIZE, PATCH = 32, 8  # a 4 x 4 grid


def frames(count: int = 3, seed: int = 0) -> list:
    """PIL frames, not square and not at the model's size: the module resizes them whole."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("siglip"))
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             image_size=SIZE, patch_size=PATCH)
    model = transformers.SiglipVisionModel(config).eval()
    tiny.randomize_(model, seed=3)
    model.save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[0, 2], ids=["dinov2", "dinov2_registers"])
def dinov2(tmp_path_factory, request) -> str:
    path = str(tmp_path_factory.mktemp("dino"))
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIZE,
                patch_size=PATCH)
    if request.param:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**size, num_register_tokens=2))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**size))
    tiny.randomize_(model.eval(), seed=4)
    model.save_pretrained(path)
    transformers.BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


def brute_force_map_attention(model: transformers.SiglipVisionModel, tokens: np.ndarray) -> np.ndarray:
    """The probe's attention over `tokens` [B, N, D], head by head, from the raw weights of
    the head's nn.MultiheadAttention (in_proj packs query, key, value), averaged over heads."""
    head = baseline_saliency.vision_tower(model).head
    heads, width = head.attention.num_heads, tokens.shape[-1]
    w, b = head.attention.in_proj_weight.detach().numpy(), head.attention.in_proj_bias.detach().numpy()
    probe = head.probe.detach().numpy()[0, 0]
    q = probe @ w[:width].T + b[:width]
    out = np.zeros(tokens.shape[:2])
    dim = width // heads
    for i, image in enumerate(tokens):
        k = image @ w[width:2 * width].T + b[width:2 * width]
        for h in range(heads):
            logits = np.array([q[h * dim:(h + 1) * dim] @ k[n, h * dim:(h + 1) * dim] for n in range(len(image))]) / np.sqrt(dim)
            weights = np.exp(logits - logits.max())
            out[i] += weights / weights.sum() / heads
    return out


def test_siglip_map_attention_is_the_probes_softmax(siglip):
    model = baseline_saliency.load(siglip)
    assert model.method == "map_attention" and model.size == SIZE and model.name.startswith("hf:siglip")
    images = saliency.load_frames(frames(), SIZE)
    # The pixels are the model's own processor's, for frames already at its size.
    processor = transformers.AutoImageProcessor.from_pretrained(siglip)
    want_pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(baseline_saliency.pixel_values(model, images).numpy(), want_pixels.numpy(), atol=1e-5)
    got = baseline_saliency.patch_maps(model, images)
    hf = transformers.SiglipVisionModel.from_pretrained(siglip).eval()
    with torch.no_grad():
        tokens = hf(pixel_values=want_pixels).last_hidden_state.numpy()
    want = brute_force_map_attention(hf, tokens)
    assert got.shape == (3, (SIZE // PATCH) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=1e-5)
    assert (got.max(axis=1) / got.min(axis=1)).min() > 1.5  # not uniform: the random probe prefers some patches


def test_dinov2_map_is_the_first_principal_component(dinov2):
    model = baseline_saliency.load(dinov2)
    assert model.method == "pca" and model.size == SIZE
    images = saliency.load_frames(frames(), SIZE)
    got = baseline_saliency.patch_maps(model, images)
    hf = transformers.AutoModel.from_pretrained(dinov2).eval()
    registers = getattr(hf.config, "num_register_tokens", 0)
    with torch.no_grad():
        hidden = hf(pixel_values=baseline_saliency.pixel_values(model, images)).last_hidden_state.numpy()
    assert hidden.shape[1] == 1 + registers + (SIZE // PATCH) ** 2
    for image, row in zip(hidden, got):
        patches = image[1 + registers:].astype(np.float64)
        centred = patches - patches.mean(axis=0)
        values, vectors = np.linalg.eigh(centred.T @ centred)
        score = centred @ vectors[:, -1]  # the largest eigenvalue's eigenvector
        np.testing.assert_allclose(np.abs(row), np.abs(score), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(row, score * np.sign(score @ row), rtol=1e-3, atol=1e-4)
        assert (row > 0).sum() <= (row < 0).sum()  # the sign: the smaller side is positive


def test_one_sheet_holds_caip_and_the_baselines(siglip, tmp_path):
    """A row per model, column j always frame j; per-frame PNGs of each baseline in `out`."""
    caip_tiles = [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(3)]
    rows = baseline_saliency.draw([f"hf:{siglip}"], frames(), 64, str(tmp_path))
    assert len(rows) == 1 and len(rows[0][0]) == 3 and rows[0][1][0].endswith("MAP-head attention")
    for i, tile in enumerate(rows[0][0]):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{rows[0][1][0].split(':')[1]}_{i:03d}.png")), tile)
    sheet = baseline_saliency.sheet(caip_tiles, ["a", "b", "c"], rows)
    assert sheet.shape[1] == 3 * 64 + 4 * 4  # three columns
    alone = saliency.contact_sheet(caip_tiles, ["CAIP: a", "CAIP: b", "CAIP: c"], columns=3)
    assert sheet.shape[0] > alone.shape[0] + 64  # a second row
    np.testing.assert_array_equal(sheet[4:68, 4:68], caip_tiles[0])  # CAIP first, frame 0 top left
    caption = (sheet.shape[0] - 3 * 4) // 2 - 64  # two rows of tile + caption, three pads
    y = 4 + 64 + caption + 4  # the baseline's row, frame 1 in the second column
    np.testing.assert_array_equal(sheet[y:y + 64, 4 + 68:68 + 68], rows[0][0][1])


def test_what_is_not_a_supported_model_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"--encoder 'dino': give hf:PATH"):
        baseline_saliency.check_specs(["dino"])
    with pytest.raises(ValueError, match=r"is not a Hugging Face model directory \(no config.json\)"):
        baseline_saliency.check_specs([f"hf:{tmp_path}"])
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=SIZE, patch_size=PATCH)
    transformers.ViTModel(config).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match=r"is a ViTModel: baseline saliency supports SigLIP"):
        baseline_saliency.load(str(tmp_path / "vit"))
