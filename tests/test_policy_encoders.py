"""The policy's frozen-encoder adapters give what the encoders give through their own forward
pass: a Hugging Face vision directory (DINOv2, SigLIP) through transformers, a CAIP export
through its PyTorch model; paths that name no encoder are refused by name."""
import os

import jax
import numpy as np
import pytest
import tiny
import tiny_run_config
import torch
import transformers
from PIL import Image

from caip_jax import run_state
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import tokenizer
from caip_jax.export import hf_dir
from caip_jax.policy import encoders

TOL = 2e-5


def frames(count: int = 3, seed: int = 0) -> np.ndarray:
    """Camera frames [B, 40, 48, 3] uint8, not square: every adapter must resize them."""
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 48, 3), dtype=np.uint8)


def tiny_dinov2(path: str) -> None:
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       image_size=32, patch_size=8)
    model = transformers.Dinov2Model(config).eval()
    tiny.randomize_(model, seed=1)
    model.save_pretrained(path)
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def tiny_siglip(path: str) -> None:
    tiny.random_hf_siglip(tiny.hf_siglip_config(), seed=2).save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE}).save_pretrained(path)


@pytest.mark.parametrize("make", [tiny_dinov2, tiny_siglip])
def test_hf_vision_directory_gives_its_own_outputs(make, tmp_path):
    make(str(tmp_path))
    images = frames()
    model = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    pooled, patches = [], []
    with torch.no_grad():
        for image in images:  # one PIL image at a time, through the model's own entry points
            pixels = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
            if isinstance(model, transformers.SiglipModel):
                out = model.get_image_features(pixel_values=pixels)
            else:
                out = model(pixel_values=pixels)
            pooled.append(out.pooler_output[0].numpy())
            patches.append(out.last_hidden_state[0].numpy())
    for kind, want in (("pooled", np.stack(pooled)[:, None]), ("patches", np.stack(patches))):
        encoder = encoders.load(f"hf:{tmp_path}", kind, None, cache=str(tmp_path / "cache"))
        got = encoder.encode(images, ["press the button"] * 3, None)
        assert got.shape == want.shape and np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def caip_export(tmp_path_factory) -> tuple[str, str]:
    """A tiny CAIP checkpoint whose every parameter is random (LayerNorm scales around 1),
    drawn in numpy from the shapes (no JAX initialisation to compile), and its export:
    (workdir, export directory)."""
    root = tmp_path_factory.mktemp("caip")
    texts = ["press the button", "open the drawer", "pick up the cup"] * 20
    config = tiny_run_config.get_config()
    config.data.tokenizer = tokenizer.train_sentencepiece(texts, str(root / "spm"), 284)
    config.mesh.update(data=1, fsdp=-1)
    rng = np.random.default_rng(3)
    abstract = run_state.abstract_params(run_state.setup(config))
    draw = lambda path, x: (("scale" in jax.tree_util.keystr(path)) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(draw, abstract)
    workdir = str(root / "run")
    checkpoints = Checkpoints(workdir, asynchronous=False)
    checkpoints.save(1, params, config=config)
    checkpoints.close()
    export = str(root / "caip-tiny")
    hf_dir.export(workdir, export)
    return workdir, export


def test_caip_export_gives_the_pytorch_models_outputs(caip_export, tmp_path):
    workdir, export = caip_export
    images, texts = frames(), ["press the button", "open the drawer", "press the button"]
    model = transformers.AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(export, trust_remote_code=True)
    with torch.no_grad():
        out = model(**processor(images=list(images), text=texts, return_tensors="pt"))
    want = dict(pooled=out.image_pooled.numpy()[:, None], patches=out.patch_features.numpy())
    for kind in ("pooled", "patches"):
        from_export = encoders.load(export, kind, None, cache=str(tmp_path / kind))
        assert from_export.name == "caip:caip-tiny"
        got = from_export.encode(images, texts, None)
        assert got.shape == want[kind].shape and np.abs(want[kind]).max() > 0.1
        np.testing.assert_allclose(got, want[kind], rtol=1e-4, atol=1e-4)
    # The instruction conditions the pooled features: another text, another embedding.
    other = from_export if kind == "pooled" else encoders.load(export, "pooled", None, cache=str(tmp_path / "pooled"))
    assert not np.allclose(other.encode(images, ["pick up the cup"] * 3, None), want["pooled"], atol=1e-3)
    # The workdir the export came from gives the same features.
    from_workdir = encoders.load(workdir, "pooled", None, cache="")
    assert from_workdir.name == "caip:run"
    np.testing.assert_allclose(from_workdir.encode(images, texts, None), want["pooled"], rtol=1e-4, atol=1e-4)
    # Its config is the one the random and SigLIP 2 baselines are built from.
    assert encoders.caip_config(export).model.to_dict() == encoders.caip_config(workdir).model.to_dict()


def test_siglip2_baseline_sees_with_siglip2s_image_tower(caip_export, tmp_path):
    """`siglip2:PATH` is CAIP (of the reference config) with SigLIP 2's towers: its patch
    features are the HF SigLIP vision tower's on the same resized frames."""
    hf = tiny.random_hf_siglip(tiny.hf_siglip_config(), seed=5)
    hf.save_pretrained(str(tmp_path / "siglip2"))
    reference = encoders.caip_config(caip_export[1])
    reference.model = tiny.tiny_model_config()  # the towers' sizes of hf_siglip_config
    encoder = encoders.load(f"siglip2:{tmp_path / 'siglip2'}", "patches", reference, cache="")
    assert encoder.name == "siglip2:siglip2"  # the name of the directory its towers came from
    images = frames()
    size = (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    pixels = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in images])
    with torch.no_grad():
        want = hf.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2) / 127.5 - 1).float())
    np.testing.assert_allclose(encoder.encode(images, ["press the button"] * 3, None),
                               want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)


def test_paths_that_name_no_encoder_are_refused(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(ValueError, match=rf"encoder '{empty}' is neither a CAIP workdir .* nor a CAIP export; valid: state, blind, random"):
        encoders.check_spec(empty)
    tiny_dinov2(str(tmp_path / "dino"))
    with pytest.raises(ValueError, match=r"a Hugging Face model: write hf:PATH"):
        encoders.check_spec(str(tmp_path / "dino"))
    with pytest.raises(ValueError, match=r"is not a Hugging Face model directory \(no config.json\)"):
        encoders.check_spec(f"hf:{empty}")
    with pytest.raises(ValueError, match=r"features='cls' is not one of \('pooled', 'patches'\)"):
        encoders.load(f"hf:{tmp_path / 'dino'}", "cls", None, cache="")
    with pytest.raises(ValueError, match="encoder 'random' needs a CAIP config: give a CAIP workdir or export"):
        encoders.load("random", "pooled", None, cache="")
