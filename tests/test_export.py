"""The PyTorch export: a Hugging Face directory that AutoModel/AutoProcessor load as the paper's
"Get started" shows, giving what the JAX model gives; and the way back."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import tiny_run_config
import torch
import transformers
from flax import traverse_util
from PIL import Image

from caip_jax import train
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline
from caip_jax.export import hf_dir, safetensors_stream
from caip_jax.export.hf.configuration_caip import CAIPConfig
from caip_jax.export.hf.modeling_caip import CAIPModel
from caip_jax.models import layout, model_from_config
from caip_jax.models.summary import abstract_params

# The paper's "Get started", as published; only REPO is set to the exported directory.
SNIPPET = '''
from transformers import AutoModel, AutoProcessor
from PIL import Image
import torch

REPO = "yuvansharma/caip-vitl256"
model = AutoModel.from_pretrained(REPO, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)

image = Image.open("example.png").convert("RGB")
inputs = processor(images=image, text="pick up the red cup", return_tensors="pt")

with torch.no_grad():
    out = model(**inputs)

# out.image_pooled    [B, 1024]       text-conditioned pooled image embedding
# out.patch_features  [B, 256, 1024]  patch tokens
# out.text_tokens     [B, 64, 1024]   text token embeddings
# out.text_pooled     [B, 1024]       pooled text embedding
'''
OUTPUTS = ("image_pooled", "patch_features", "text_tokens", "text_pooled", "image_map", "action_embedding")


def run_config(record_set):
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    config.total_steps = 3
    # Pooling heads differ from the towers' (4) and the action tower's (3): each group of
    # attention blocks must be converted with its own head count.
    config.model.pool.update(num_heads=2, mlp_dim=48)
    return config


@pytest.fixture(scope="module")
def trained(record_set, tmp_path_factory):
    """A tiny CAIP trained 3 steps, exported in float32: (config, workdir, export dir)."""
    config = run_config(record_set)
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train(config, workdir)
    out = str(tmp_path_factory.mktemp("hf") / "caip-tiny")
    hf_dir.export(workdir, out)
    return config, workdir, out


@pytest.fixture(scope="module")
def trained_scanned(trained, tmp_path_factory):
    """The trained parameters stacked into a checkpoint of the scanned model (model.scan), and
    its export: (config, workdir, export dir)."""
    config, workdir, _ = trained
    config = config.copy_and_resolve_references()
    config.model.scan = True
    scanned_workdir = str(tmp_path_factory.mktemp("run_scanned"))
    checkpoints = Checkpoints(scanned_workdir, asynchronous=False)
    checkpoints.save(config.total_steps, traverse_util.unflatten_dict(layout.stack(checkpoint_params(workdir)), sep="/"),
                     config=config)
    checkpoints.close()
    out = str(tmp_path_factory.mktemp("hf_scanned") / "caip-tiny")
    hf_dir.export(scanned_workdir, out)
    return config, scanned_workdir, out


@pytest.fixture(params=["per_block", "scanned"])
def exported(request, trained, trained_scanned):
    """Each layout's run: (config, workdir, export dir)."""
    return trained if request.param == "per_block" else trained_scanned


def checkpoint_params(workdir):
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    flat = checkpoints.read_params(step, list(checkpoints.param_metadata(step)))
    checkpoints.close()
    return flat


def inputs(config, record_set, count=4, seed=0):
    """Record images and texts (as training preprocesses them, without augmentation) and random
    action chunks with some hands missing."""
    model = config.model
    preprocess = pipeline.Preprocess(record_set[1], model.image_size, model.text.length, model.action.horizon)
    samples = [pipeline.eval_samples(record_set[0], preprocess)[i] for i in range(count)]
    rng = np.random.default_rng(seed)
    return dict(
        image=np.stack([s["image"] for s in samples]).astype(np.float32) / 255 * 2 - 1,
        text=np.stack([s["text"] for s in samples]),
        action=rng.normal(size=(count, model.action.horizon, 2, 21, 9)).astype(np.float32),
        action_mask=rng.random((count, model.action.horizon, 2)) < 0.8,
    )


def jax_outputs(config, flat, batch):
    params = traverse_util.unflatten_dict(flat, sep="/")
    model = model_from_config(config.model)
    out = model.apply({"params": params}, **batch, return_attention=True)
    return jax.tree.map(np.asarray, out)


def torch_outputs(model, batch):
    with torch.no_grad():
        out = model(
            pixel_values=torch.from_numpy(batch["image"]).permute(0, 3, 1, 2),
            input_ids=torch.from_numpy(batch["text"]).long(),
            action=torch.from_numpy(batch["action"]),
            action_mask=torch.from_numpy(batch["action_mask"]),
            output_attentions=True,
        )
    return {k: v.float().numpy() for k, v in out.items()}


def test_torch_gives_the_jax_outputs(exported, record_set):
    config, workdir, out = exported
    batch, params = inputs(config, record_set), checkpoint_params(workdir)
    expected = jax_outputs(config, params, batch)
    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    got = torch_outputs(model, batch)
    for name in OUTPUTS + ("stage1_attention", "stage2_attention"):
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0, err_msg=name)
    # The padded text positions really are masked in stage 2, so the check above covers masking.
    assert (expected["stage2_attention"][batch["text"][:, None, :].repeat(2, 1) == 0] == 0).all()
    # Sigmoid logits as SiglipModel's: exp(t) * cosine(image+text, action) + b, from JAX's values.
    z = [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (expected["image_pooled"], expected["action_embedding"])]
    logits = z[0] @ z[1].T * np.exp(params["t"]) + params["b"]
    np.testing.assert_allclose(got["logits_per_image"], logits, atol=1e-4)
    np.testing.assert_allclose(got["logits_per_action"], logits.T, atol=1e-4)


def test_the_papers_snippet_runs_on_the_export(trained, tmp_path):
    config, _, out = trained
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(tmp_path / "example.png")
    script = SNIPPET.replace("yuvansharma/caip-vitl256", out)
    script += "print({k: list(getattr(out, k).shape) for k in ('image_pooled', 'patch_features', 'text_tokens', 'text_pooled')})\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shapes = json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))
    d, n, length = 32, (config.model.image_size // 8) ** 2, config.model.text.length
    assert shapes == dict(image_pooled=[1, d], patch_features=[1, n, d], text_tokens=[1, length, d], text_pooled=[1, d])


def test_export_then_import_gives_back_identical_parameters(exported, tmp_path):
    config, workdir, out = exported
    hf_dir.import_torch(out, str(tmp_path / "back"))
    original, back = checkpoint_params(workdir), checkpoint_params(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    restored = Checkpoints(str(tmp_path / "back")).restore_config(0)
    assert restored.model.to_dict() == config.model.to_dict()


def test_a_scanned_checkpoint_exports_the_same_directory(trained, trained_scanned):
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(trained[2], name), "rb") as a, open(os.path.join(trained_scanned[2], name), "rb") as b:
            assert a.read() == b.read(), name


def test_import_converts_an_export_to_the_configs_layout(trained, trained_scanned, tmp_path):
    """A per-block run's export imported with model.scan=True holds the scanned run's very
    parameters (and the other way round): the explicit conversion between the layouts."""
    for source, target in ((trained, trained_scanned), (trained_scanned, trained)):
        back = str(tmp_path / f"scan_{target[0].model.scan}")
        hf_dir.import_torch(source[2], back, run=target[0])
        expected, got = checkpoint_params(target[1]), checkpoint_params(back)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_run_converted_to_scanned_trains_as_the_per_block_one(trained, tmp_path):
    """One export imported per block and scanned trains the same: equal losses, parameters
    equal but for float rounding, and the scanned run's checkpoints hold stacked blocks."""
    config, _, out = trained
    runs = {}
    for scan in (False, True):
        run = config.copy_and_resolve_references()
        run.model.scan, run.total_steps = scan, 2
        workdir = str(tmp_path / f"scan_{scan}")
        hf_dir.import_torch(out, workdir, run=run)
        train.train(run, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            runs[scan] = {m["step"]: m["loss"] for m in map(json.loads, f)}, checkpoint_params(workdir)
    (losses, params), (scanned_losses, scanned_params) = runs[False], runs[True]
    assert sorted(losses) == sorted(scanned_losses) == [1, 2]
    np.testing.assert_allclose([scanned_losses[k] for k in (1, 2)], [losses[k] for k in (1, 2)], rtol=1e-5)
    assert layout.is_scanned(scanned_params) and not layout.is_scanned(params)
    scanned_params = layout.unstack(scanned_params)
    assert scanned_params.keys() == params.keys()
    # Adam turns rounding differences of near-zero gradients into updates of size lr, so only
    # the global relative difference is a fair measure (as in test_train).
    flat = lambda p: np.concatenate([np.ravel(p[k]) for k in sorted(params)])
    assert np.linalg.norm(flat(scanned_params) - flat(params)) < 1e-5 * np.linalg.norm(flat(params))


def test_a_checkpoint_of_the_other_layout_is_refused_by_name(trained, trained_scanned):
    """Checkpoints hold the layout they were trained with; restoring one into the other layout
    names the tensors (convert with export and import, as above)."""
    config, _, _ = trained_scanned
    checkpoints = Checkpoints(trained[1], asynchronous=False)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['img'\]\['Transformer'\]\['encoderblock'\]"):
        checkpoints.check_shapes(config.total_steps, "params", abstract_params(config.model))
    checkpoints.close()


def test_torch_refuses_inputs_of_the_wrong_size(trained):
    """As the Flax model does (its learned positions have one size): a text, action or image of
    another length is an error naming the input and the size it must have, not cut to fit."""
    config, _, out = trained
    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    m = config.model
    size, length, horizon = m.image_size, m.text.length, m.action.horizon
    image = torch.zeros(2, 3, size, size)
    text = torch.ones(2, length, dtype=torch.long)
    action, mask = torch.zeros(2, horizon, 2, 21, 9), torch.ones(2, horizon, 2, dtype=torch.bool)
    model(pixel_values=image, input_ids=text, action=action, action_mask=mask)  # the right sizes pass
    cases = [
        (dict(input_ids=text[:, :-1]), rf"input_ids has shape \[2, {length - 1}\]; this model takes \[2, {length}\]"),
        (dict(input_ids=torch.ones(2, length + 1, dtype=torch.long)), rf"input_ids has shape \[2, {length + 1}\]"),
        (dict(input_ids=text[:1]), rf"input_ids has shape \[1, {length}\]; this model takes \[2, {length}\]: one text per image"),
        (dict(action=action[:, :-1], action_mask=mask[:, :-1]),
         rf"action has shape \[2, {horizon - 1}, 2, 21, 9\]; this model takes \[B, {horizon}, 2, 21, 9\]"),
        (dict(action_mask=mask[:, :-1]), rf"action_mask has shape \[2, {horizon - 1}, 2\]; this model takes \[2, {horizon}, 2\]"),
        (dict(pixel_values=torch.zeros(2, 3, size + 8, size + 8)), rf"pixel_values has shape \[2, 3, {size + 8}, {size + 8}\]"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**dict(dict(pixel_values=image, input_ids=text, action=action, action_mask=mask), **change))


def test_bfloat16_export_stays_close(trained, record_set, tmp_path):
    config, workdir, _ = trained
    hf_dir.export(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "bf16"), trust_remote_code=True).eval()
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    batch = inputs(config, record_set)
    expected = jax_outputs(config, checkpoint_params(workdir), batch)
    got = torch_outputs(model, batch)
    for name in OUTPUTS:
        # bfloat16 keeps 8 significant bits; errors grow through the layers. The stated
        # tolerance: 5% of the output's largest magnitude, and cosine similarity above 0.999.
        scale = np.abs(expected[name]).max()
        assert np.abs(got[name] - expected[name]).max() < 0.05 * scale, name
        a, b = got[name].reshape(len(got[name]), -1), expected[name].reshape(len(got[name]), -1)
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() > 0.999, (name, cosine)


def test_exporting_a_checkpoint_of_another_config_names_the_tensor(trained, tmp_path):
    config, workdir, _ = trained
    other = config.copy_and_resolve_references()
    other.model.action.horizon = 4  # the checkpoint's act/pos_embedding has 8 steps
    checkpoints = Checkpoints(str(tmp_path / "mismatch"), asynchronous=False)
    params = traverse_util.unflatten_dict(checkpoint_params(workdir), sep="/")
    checkpoints.save(3, params, config=other)
    checkpoints.close()
    with pytest.raises(ValueError, match=r"\['act'\]\['pos_embedding'\]: checkpoint \(1, 8, 24\) vs model \(1, 4, 24\)"):
        hf_dir.export(str(tmp_path / "mismatch"), str(tmp_path / "out"))


def test_streamed_safetensors_read_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32), "b": np.float32(rng.normal(size=(1,)))}
    specs = {k: (v.shape, "float32") for k, v in arrays.items()}
    path = str(tmp_path / "model.safetensors")
    safetensors_stream.save(path, specs, arrays.items(), metadata={"format": "pt"})
    loaded = safetensors.numpy.load_file(path)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
    with pytest.raises(ValueError, match="'b' .* arrived where 'a.weight'"):
        safetensors_stream.save(path, specs, reversed(list(arrays.items())))
    bf16 = {k: (v.shape, "bfloat16") for k, v in arrays.items()}
    safetensors_stream.save(path, bf16, arrays.items())
    from safetensors.torch import load_file
    np.testing.assert_array_equal(load_file(path)["a.weight"].float().numpy(),
                                  torch.from_numpy(arrays["a.weight"]).bfloat16().float().numpy())


def test_the_directory_holds_the_hf_files(trained):
    config, workdir, out = trained
    for name in ("config.json", "configuration_caip.py", "modeling_caip.py", "processing_caip.py",
                 "processor_config.json", "preprocessor_config.json", "tokenizer.model", "model.safetensors",
                 "caip_config.json", "action_stats.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    # The action statistics caip-train kept in its checkpoint travel with the export.
    checkpoints = Checkpoints(workdir)
    with open(os.path.join(out, "action_stats.json")) as f:
        assert json.load(f) == checkpoints.restore_json(checkpoints.latest_step(), "action_stats")
    checkpoints.close()
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["auto_map"] == {"AutoConfig": "configuration_caip.CAIPConfig", "AutoModel": "modeling_caip.CAIPModel"}
    # preprocessor_config.json describes what the processor does, in image-processor terms.
    with open(os.path.join(out, "preprocessor_config.json")) as f:
        image_config = json.load(f)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    size = image_config["size"]
    x = np.asarray(image.resize((size["width"], size["height"]), image_config["resample"]), np.float32)
    x = (x * np.float32(image_config["rescale_factor"]) - np.float32(image_config["image_mean"])) / np.float32(image_config["image_std"])
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    np.testing.assert_allclose(processor(images=image)["pixel_values"][0], x.transpose(2, 0, 1), atol=1e-6)
    assert size["height"] == config.model.image_size


def test_the_l16_export_gives_the_papers_shapes():
    """The paper's L/16 shapes, from the config the exporter writes for configs/caip_vitl16_256.py
    (built on the meta device: shapes without the 3.7 GB of weights)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "caip_vitl16_256.py")
    spec = importlib.util.spec_from_file_location("caip_vitl16_256", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = CAIPModel(CAIPConfig(**hf_dir.hf_config(module.get_config().model)))
        out = model(pixel_values=torch.zeros(1, 3, 256, 256), input_ids=torch.zeros(1, 64, dtype=torch.long))
    shapes = {k: list(out[k].shape) for k in ("image_pooled", "patch_features", "text_tokens", "text_pooled")}
    assert shapes == dict(image_pooled=[1, 1024], patch_features=[1, 256, 1024], text_tokens=[1, 64, 1024], text_pooled=[1, 1024])
