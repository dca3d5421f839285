"""The export's action half: the checkpoint's action statistics travel into the exported
directory, and its processor turns raw camera-frame hand poses into the model's normalised
action input as training does (against caip_jax.actions and the on-device chunking), so that
AutoProcessor + AutoModel give the JAX model's action embedding."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_run_config
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from caip_jax import actions, device_prep, run_state
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline, records
from caip_jax.export import hf_dir
from caip_jax.export.hf.processing_caip import CAIPProcessor
from caip_jax.models import dummy_inputs, model_from_config

HORIZON = 8  # tests/tiny.py's model.action.horizon


def random_poses(rng, batch, steps=HORIZON + 1):
    """Camera-frame poses [B, T+1, 2, 21, 4, 4] (random rotations, translations within a metre)
    and valid [B, T+1, 2] with about a quarter of the hand-frames missing, those holding NaN."""
    rot = actions.quat_to_matrix(rng.normal(size=(batch, steps, 2, 21, 4)))
    poses = actions.compose(rot, rng.uniform(-1, 1, (batch, steps, 2, 21, 3)))
    valid = rng.random((batch, steps, 2)) > 0.25
    valid[0, :, 1] = False  # a row with one hand absent throughout
    poses[~valid] = np.nan
    return poses, valid


def random_stats(rng, delta, stats="per_source", normalize=True, sources=("lab", "robot")):
    """An action_stats dict as run_state.stats_to_json writes it; some std are 0 (a dimension
    constant over the data), which normalisation takes as 1."""
    entries = {}
    for name in sources:
        std = rng.uniform(0.2, 2, (2, 21, 9))
        std[0, 0, :3] = 0
        entries[name] = dict(mean=rng.normal(size=(2, 21, 9)).tolist(), std=std.tolist())
    return dict(delta=delta, horizon=HORIZON, normalize=normalize, stats=stats, sources=entries)


def processor(spm, action_stats):
    return CAIPProcessor(spm, image_size=16, text_length=8, action_stats=action_stats)


@pytest.mark.parametrize("delta", actions.DELTAS)
def test_actions_are_caip_chunks_normalised(record_set, delta):
    rng = np.random.default_rng(0)
    stats = random_stats(rng, delta)
    mean, std = run_state.stats_arrays(stats)
    poses, valid = random_poses(rng, 3)
    sources = ["robot", "lab", "robot"]
    got = processor(record_set[1], stats).actions(poses, valid, source=sources)
    assert got["action"].dtype == np.float32 and got["action"].shape == (3, HORIZON, 2, 21, 9)
    assert got["action_mask"].dtype == bool and got["action_mask"].shape == (3, HORIZON, 2)
    for i, name in enumerate(sources):
        chunk, mask = actions.action_chunk(poses[i], valid[i], delta)
        s = list(stats["sources"]).index(name)
        np.testing.assert_array_equal(got["action_mask"][i], mask)
        np.testing.assert_allclose(got["action"][i], actions.normalize(chunk, mask, mean[s], std[s]), rtol=0, atol=1e-5)
    assert not got["action_mask"][0, :, 1].any() and (got["action"][0, :, 1] == 0).all()
    # One unbatched chunk is the batch's row.
    one = processor(record_set[1], stats).actions(poses[2], valid[2], source="robot")
    np.testing.assert_array_equal(one["action"][0], got["action"][2])


def test_mixture_and_unnormalised_stats(record_set):
    rng = np.random.default_rng(1)
    poses, valid = random_poses(rng, 2)
    mixture = random_stats(rng, "anchor", stats="mixture", sources=("lab",))
    mixture["sources"]["robot"] = mixture["sources"]["lab"]  # a mixture's rows are all equal
    mean, std = run_state.stats_arrays(mixture)
    chunk, mask = zip(*(actions.action_chunk(p, v, "anchor") for p, v in zip(poses, valid)))
    got = processor(record_set[1], mixture).actions(poses, valid)  # no source needed
    np.testing.assert_allclose(got["action"], actions.normalize(np.stack(chunk), np.stack(mask), mean[0], std[0]), atol=1e-5)
    identity = processor(record_set[1], random_stats(rng, "anchor", normalize=False)).actions(poses, valid)
    np.testing.assert_allclose(identity["action"], np.stack(chunk), rtol=0, atol=1e-6)


def stored_batch(record_set, count=6):
    """The first `count` records: their samples (stored poses) and the device batch of them."""
    directory, spm = record_set
    preprocess = pipeline.Preprocess(spm, 16, 8, horizon=HORIZON)
    samples = [records.decode(r) for r in records.read_shard(records.shard_paths(directory)[0])[:count]]
    rows = [preprocess(records.encode(s)) for s in samples]
    batch = {k: np.stack([r[k] for r in rows]) for k in device_prep.POSE_KEYS + ("valid",)}
    batch["source_index"] = np.zeros(count, np.int32)
    # The records track both hands throughout; drop some: from a step on, and at the anchor.
    batch["valid"][1, 4:, 0] = batch["valid"][2, 0, 1] = False
    poses = np.stack([actions.decompress_poses(s["poses"])[: HORIZON + 1] for s in samples])
    return batch, poses, batch["valid"]


@pytest.mark.parametrize("delta", actions.DELTAS)
def test_actions_are_the_training_steps_chunks(record_set, delta):
    """The device's chunk of the stored offsets, normalised with the record set's statistics, from
    the poses those offsets decode to: equal to float32 rounding in action units. Normalised, the
    device's rounding (2.2e-7) grows by 1 / std, up to 1e-4 where the step-to-step rotations vary
    by 1e-3, so the exact chunk of those poses is the 1e-5 reference."""
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    config.data.delta = delta
    stats = run_state.stats_to_json(config, *run_state.action_stats(config))
    mean, std = run_state.stats_arrays(stats)
    batch, poses, valid = stored_batch(record_set)
    expected, mask = jax.jit(device_prep.action_chunks, static_argnums=(1, 2))(batch, HORIZON, delta, mean, std)
    got = processor(record_set[1], stats).actions(poses, valid)
    np.testing.assert_array_equal(got["action_mask"], mask)
    scale = np.where(std[0] == 0, 1, std[0])
    np.testing.assert_allclose(got["action"] * scale, np.asarray(expected) * scale, rtol=0, atol=1e-6)
    exact = [actions.normalize(*actions.action_chunk(p, v, delta), mean[0], std[0]) for p, v in zip(poses, valid)]
    np.testing.assert_allclose(got["action"], np.stack(exact), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def trained(record_set, tmp_path_factory):
    """A tiny CAIP's checkpoint with what caip-train saves for the export (parameters, config and
    the record set's action statistics; no optimizer state, which the export never reads),
    exported: (config, workdir, export dir)."""
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    model = model_from_config(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **dummy_inputs(config.model)))["params"]
    workdir = str(tmp_path_factory.mktemp("run"))
    checkpoints = Checkpoints(workdir, asynchronous=False)
    checkpoints.save(1, params, config=config, action_stats=run_state.stats_to_json(config, *run_state.action_stats(config)))
    checkpoints.close()
    out = str(tmp_path_factory.mktemp("hf") / "caip-tiny")
    hf_dir.export(workdir, out)
    return config, workdir, out


def test_autoprocessor_and_automodel_give_the_jax_action_embedding(trained, record_set):
    config, workdir, out = trained
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    stored = checkpoints.restore_json(step, "action_stats")
    flat = checkpoints.read_params(step, list(checkpoints.param_metadata(step)))
    checkpoints.close()
    with open(os.path.join(out, "action_stats.json")) as f:
        assert json.load(f) == stored
    # Training's step: the device chunks of the stored offsets with the checkpoint's statistics.
    batch, poses, valid = stored_batch(record_set)
    mean, std = run_state.stats_arrays(stored)
    action, mask = device_prep.action_chunks(batch, HORIZON, config.data.delta, mean, std)
    params = traverse_util.unflatten_dict(flat, sep="/")
    model = model_from_config(config.model)
    expected = np.asarray(model.apply({"params": params}, action, mask, method=model.encode_action))

    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    torch_model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    inputs = processor(poses=poses, valid=valid, return_tensors="pt")
    assert set(inputs) == {"action", "action_mask"} and inputs["action_mask"].dtype == torch.bool
    with torch.no_grad():
        got = torch_model.get_action_features(**inputs).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# Run in a fresh interpreter where importing JAX or caip_jax fails, as on a PyTorch-only machine.
STANDALONE = """
import sys
sys.modules["jax"] = sys.modules["caip_jax"] = None
import numpy as np
import transformers
processor = transformers.AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
inputs = np.load("inputs.npz")
np.savez("outputs.npz", **processor.actions(inputs["poses"], inputs["valid"]))
"""


def test_the_exported_processor_runs_without_jax(trained, record_set, tmp_path):
    _, _, out = trained
    poses, valid = random_poses(np.random.default_rng(4), 2)
    np.savez(tmp_path / "inputs.npz", poses=poses, valid=valid)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", STANDALONE, out], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got, expected = np.load(tmp_path / "outputs.npz"), CAIPProcessor.from_pretrained(out).actions(poses, valid)
    for name in ("action", "action_mask"):
        np.testing.assert_array_equal(got[name], expected[name])


def test_bad_poses_and_sources_are_one_line_errors(record_set):
    rng = np.random.default_rng(2)
    poses, valid = random_poses(rng, 2)
    per_source = processor(record_set[1], random_stats(rng, "step"))
    errors = {
        "T\\+1=9": lambda: per_source.actions(poses[:, :-1], valid[:, :-1], "lab"),
        "shape \\(2, 9, 2, 21, 3, 4\\)": lambda: per_source.actions(poses[..., :3, :], valid, "lab"),
        "valid of dtype float64": lambda: per_source.actions(poses, valid.astype(float), "lab"),
        "valid of dtype bool and shape \\(2, 9\\)": lambda: per_source.actions(poses, valid[..., 0], "lab"),
        "both poses= .* and valid=": lambda: per_source(poses=poses, source="lab"),
        "both poses= .* and valid= ": lambda: per_source(text="pick up cup 1", source="lab"),
        "statistics per source: pass source= one of \\['lab', 'robot'\\]": lambda: per_source.actions(poses, valid),
        "source='wild': give one of \\['lab', 'robot'\\]": lambda: per_source.actions(poses, valid, "wild"),
        "a list of 2 of them": lambda: per_source.actions(poses, valid, ["lab"]),
    }
    for message, call in errors.items():
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    poses[1, 3, 0, 5, 0, 0] = np.nan
    valid[1, 3, 0] = True
    with pytest.raises(ValueError, match=r"poses\[1, 3, 0\] .* marked valid but holds NaN .*: mark it False in valid"):
        per_source.actions(poses, valid, "lab")


def test_an_export_of_an_imported_step_has_no_stats_and_refuses_poses(trained, tmp_path):
    """An import (caip-import-torch) is a step 0 without action statistics: its export says so."""
    config, _, out = trained
    workdir, again = str(tmp_path / "imported"), str(tmp_path / "hf")
    hf_dir.import_torch(out, workdir)
    hf_dir.export(workdir, again)
    assert not os.path.exists(os.path.join(again, "action_stats.json"))
    loaded = CAIPProcessor.from_pretrained(again)
    assert loaded(text="pick up cup 1")["input_ids"].shape == (1, config.model.text.length)  # the rest of it still works
    poses, valid = random_poses(np.random.default_rng(3), 1)
    with pytest.raises(ValueError, match="no action statistics .*an imported step 0.*caip-export-torch --step N") as error:
        loaded(poses=poses, valid=valid)
    assert "\n" not in str(error.value)
