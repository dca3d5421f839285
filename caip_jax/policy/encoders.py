"""Frozen encoders the policy can stand on, all behind one call: frames, instructions and
simulator states of a batch -> feature tokens [B, N, D] (N = 1 for the pooled embedding).

Specs (caip-policy-eval's --encoder):
    state          the simulator's ground-truth state (no image: the upper bound that shows
                   the policy itself works)
    blind          constant features (no image, no simulator state): what the instruction and
                   the robot's proprioception alone achieve, the floor an encoder must beat
    random         CAIP at random init (the reference CAIP config: the first CAIP path given,
                   or the one `parse` is passed)
    siglip2:PATH   CAIP with SigLIP 2's towers from PATH (.npz or HF directory), the rest random
    hf:PATH        any Hugging Face vision model directory AutoModel loads (DINOv2, SigLIP 2,
                   ...): its `pooler_output`, or its `last_hidden_state` tokens
    PATH           a CAIP workdir (PATH/checkpoints) or a CAIP PyTorch export (PATH/config.json
                   with model_type "caip"), run in JAX

CAIP's features: "pooled" is `image_pooled` (conditioned on the instruction), "patches" is
`patch_features`. Frames are prepared exactly as the evaluation pipeline prepares a record
(caip_jax.data.pipeline.Preprocess without augmentation, device_prep's scaling to [-1, 1]),
instructions tokenised as in training.

`identity(spec, ...)` describes an encoder exactly (spec, checkpoint step and commit time,
config, the contents of its files): caip_jax.policy.cache keys every cache on it.
"""
import dataclasses
import json
import os
import shutil
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from caip_jax import device_prep, run_state, sharding, storage
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline
from caip_jax.policy import cache as caches

KINDS = ("pooled", "patches")
SPECS = "state, blind, random, siglip2:PATH, hf:PATH, or the path of a CAIP workdir or CAIP export"


class FrozenEncoder(Protocol):
    name: str
    needs_images: bool

    def encode(self, images: np.ndarray | None, texts: list[str], env_states: np.ndarray | None) -> np.ndarray:
        """images [B, H, W, 3] uint8 (None if not `needs_images`), B instructions, simulator
        states [B, O] -> features [B, N, D] float32."""
        ...


@dataclasses.dataclass
class StateOracle:
    """The simulator's full state as one token: what a perfect encoder could at most recover."""

    name: str = "state"
    needs_images: bool = False

    def encode(self, images, texts, env_states):
        if env_states is None:
            raise ValueError("the state encoder needs the simulator state (observation.environment_state)")
        return np.asarray(env_states, np.float32)[:, None]


@dataclasses.dataclass
class BlindEncoder:
    """One constant token [B, 1, 1] of zeros: the policy sees the instruction and the robot's
    proprioception only (what a policy without vision achieves)."""

    name: str = "blind"
    needs_images: bool = False

    def encode(self, images, texts, env_states):
        batch = len(texts) if texts is not None else len(images if images is not None else env_states)
        return np.zeros((batch, 1, 1), np.float32)


class CaipEncoder:
    """A frozen CAIP image + text encoder in JAX, its parameters placed over the devices."""

    needs_images = True

    def __init__(self, name: str, config: ml_collections.ConfigDict, params, run: run_state.Setup, kind: str):
        if kind not in KINDS:
            raise ValueError(f"features={kind!r} is not one of {KINDS}")
        self.name, self.config, self.params, self.run, self.kind = name, config, params, run, kind
        model = config.model
        self._prep = pipeline.Preprocess(config.data.tokenizer, model.image_size, model.text.length, model.action.horizon)
        out = "image_pooled" if kind == "pooled" else "patch_features"

        def forward(params, images, text):
            image = device_prep.color_jitter(images, jnp.ones((images.shape[0], 3)))
            encoded = run.model.apply({"params": params}, image, text, method="encode_image_text")[out]
            return encoded[:, None] if kind == "pooled" else encoded

        self._forward = jax.jit(forward)

    def encode(self, images, texts, env_states=None):
        images = np.stack([self._prep.image(frame, None) for frame in images])
        text = np.stack([self._prep.tokenize(t) for t in texts])
        with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return np.asarray(self._forward(self.params, images, text), np.float32)


class HFVisionEncoder:
    """A Hugging Face vision model in PyTorch (CPU or the first GPU), with its own image
    processor. Two-tower models (SigLIP, CLIP) contribute their vision tower."""

    needs_images = True

    def __init__(self, name: str, path: str, kind: str):
        import torch
        import transformers

        if kind not in KINDS:
            raise ValueError(f"features={kind!r} is not one of {KINDS}")
        self.name, self.kind, self._torch = name, kind, torch
        self.processor = transformers.AutoImageProcessor.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path).eval()
        self.model = getattr(model, "vision_model", model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def encode(self, images, texts=None, env_states=None):
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with self._torch.no_grad():
            out = self.model(pixel_values=pixels)
        if self.kind == "patches":
            tokens = out.last_hidden_state
        else:
            pooled = getattr(out, "pooler_output", None)
            tokens = (out.last_hidden_state.mean(dim=1) if pooled is None else pooled)[:, None]
        return tokens.float().cpu().numpy()


def _mesh(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with its parameters over every device present (fsdp), whatever mesh trained it."""
    config = config.copy_and_resolve_references()
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return config


def _is_caip_export(path: str) -> bool:
    config = storage.join(path, "config.json")
    if not storage.exists(config):
        return False
    return storage.read_json(config).get("model_type") == "caip"


def _restore(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, run_state.Setup, dict]:
    """The config, setup and parameters (only) of a CAIP workdir's checkpoint `step` (default:
    the latest), onto the devices present."""
    checkpoints = Checkpoints(workdir, asynchronous=False)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint: train it first or give another encoder")
    config = _mesh(checkpoints.restore_config(step))
    run = run_state.setup(config)
    params = checkpoints.restore(step, run_state.abstract_params(run))["params"]
    checkpoints.close()
    return config, run, params


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def caip_from_workdir(workdir: str, kind: str, step: int | None = None) -> CaipEncoder:
    """Checkpoint `step` (default: the latest) of a CAIP workdir, with the run's tokenizer."""
    config, run, params = _restore(workdir, step)
    return CaipEncoder(f"caip:{_basename(workdir)}", config, params, run, kind)


def caip_from_export(export: str, kind: str, cache: str) -> CaipEncoder:
    """A CAIP PyTorch export, brought back into JAX once (caip-import-torch's conversion into
    the local workdir `cache`, reused after: name it by the export's identity), with the
    export's own tokenizer. The import is made beside `cache` and renamed into place when
    finished, so an import cut short is made again rather than read."""
    from caip_jax.export import hf_dir

    if not os.path.isdir(os.path.join(cache, "checkpoints")):
        partial = f"{cache}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        hf_dir.import_torch(export, partial)
        shutil.rmtree(cache, ignore_errors=True)  # an earlier import cut short
        os.replace(partial, cache)
    config, run, params = _restore(cache)
    config.data.tokenizer = os.path.join(export, "tokenizer.model")
    return CaipEncoder(f"caip:{_basename(export)}", config, params, run, kind)


def caip_initialised(config: ml_collections.ConfigDict, kind: str, siglip2: str = "", seed: int = 0) -> CaipEncoder:
    """CAIP of `config` at random init, or with SigLIP 2's towers from `siglip2`."""
    config = _mesh(config)
    run = run_state.setup(config)
    params = run_state.initial_params(run, seed, siglip2)
    return CaipEncoder(f"siglip2:{_basename(siglip2)}" if siglip2 else "random", config, params, run, kind)


def caip_config(path: str) -> ml_collections.ConfigDict:
    """The run config of a CAIP workdir or export (for the `random` and `siglip2:` baselines)."""
    if _is_caip_export(path):
        from caip_jax.export import hf_dir

        with open(os.path.join(path, hf_dir.RUN_CONFIG)) as f:
            config = ml_collections.ConfigDict(json.load(f))
        config.data.tokenizer = os.path.join(path, "tokenizer.model")
        return config
    checkpoints = Checkpoints(path, asynchronous=False)
    config = checkpoints.restore_config(checkpoints.latest_step())
    checkpoints.close()
    return config


def is_caip_path(spec: str) -> bool:
    """A CAIP workdir (holding checkpoints/) or export, local or on object storage."""
    return storage.exists(storage.join(spec, "checkpoints")) or _is_caip_export(spec)


def check_spec(spec: str) -> None:
    """Refuses, in one line naming it and the valid forms, a spec that names no encoder."""
    if spec in ("state", "blind", "random") or spec.startswith(("siglip2:", "hf:")):
        if spec.startswith("hf:") and not os.path.isfile(os.path.join(spec[3:], "config.json")):
            raise ValueError(f"encoder {spec!r}: {spec[3:]!r} is not a Hugging Face model directory (no config.json)")
        return
    if is_caip_path(spec):
        return
    hint = " (a Hugging Face model: write hf:PATH)" if os.path.isfile(os.path.join(spec, "config.json")) else ""
    raise ValueError(f"encoder {spec!r} is neither a CAIP workdir (no {spec}/checkpoints) nor a CAIP export{hint}; "
                     f"valid: {SPECS}")


def display_name(spec: str) -> str:
    """The readable name of `spec`'s encoder in tables (before telling equal names apart)."""
    if spec in ("state", "blind", "random"):
        return spec
    for prefix in ("siglip2:", "hf:"):
        if spec.startswith(prefix):
            return prefix + _basename(spec[len(prefix):])
    return f"caip:{_basename(spec)}"


def spec_path(spec: str) -> str | None:
    """The file or directory `spec` reads from, if any."""
    if spec in ("state", "blind", "random"):
        return None
    return spec.split(":", 1)[1] if spec.startswith(("siglip2:", "hf:")) else spec


def _config_identity(config: ml_collections.ConfigDict) -> dict:
    """A CAIP config as plain JSON, with the content of its tokenizer (read by path)."""
    plain = json.loads(caches.canonical(config.to_dict()))
    tokenizer = config.data.get("tokenizer", "") if "data" in config else ""
    if tokenizer and not storage.is_remote(tokenizer) and os.path.exists(tokenizer):
        plain["tokenizer_sha256"] = caches.tree_digest(tokenizer)
    return plain


def _checkpoint_identity(workdir: str) -> dict:
    """A CAIP workdir's latest step, its commit time and its config."""
    checkpoints = Checkpoints(workdir, asynchronous=False)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint: train it first or give another encoder")
    config = checkpoints.restore_config(step)
    checkpoints.close()
    try:
        committed = storage.read_json(storage.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")).get(
            "commit_timestamp_nsecs")
    except (OSError, ValueError):
        committed = None
    return dict(step=int(step), committed_ns=committed, config=_config_identity(config))


def _where(path: str) -> str:
    """An absolute local path, or a URL as given (os.path.abspath would make gs://b/x a local
    path named 'gs:')."""
    return path if storage.is_remote(path) else os.path.abspath(path)


def _reference(spec: str, reference: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The CAIP config that the `random` or `siglip2:` encoder `spec` is made from."""
    if reference is None:
        raise ValueError(f"encoder {spec!r} needs a CAIP config: give a CAIP workdir or export as another "
                         "--encoder, or --caip_config (e.g. configs/demo.py)")
    return reference


def identity(spec: str, kind: str, reference: ml_collections.ConfigDict | None, seed: int = 0) -> dict:
    """What the features of `spec`'s encoder depend on, exactly: the kind of spec, its absolute
    path, the contents of the files it is read from (an export, a Hugging Face directory,
    SigLIP 2 weights), a workdir's checkpoint step and commit time, the CAIP config (with its
    tokenizer's content) of the random and SigLIP 2 baselines and their init seed, and which
    features (`kind`). Equal identities give equal features."""
    if spec in ("state", "blind"):
        return dict(encoder=spec)
    out = dict(kind=kind)
    if spec == "random" or spec.startswith("siglip2:"):
        out.update(encoder="random" if spec == "random" else "siglip2", seed=int(seed),
                   reference=_config_identity(_reference(spec, reference)))
        if spec != "random":
            path = spec.removeprefix("siglip2:")
            out.update(path=_where(path), sha256=caches.tree_digest(path))
        return out
    if spec.startswith("hf:"):
        path = spec[3:]
        return dict(out, encoder="hf", path=_where(path), sha256=caches.tree_digest(path))
    if _is_caip_export(spec):
        return dict(out, encoder="caip_export", path=_where(spec), sha256=caches.tree_digest(spec))
    return dict(out, encoder="caip_workdir", path=_where(spec), **_checkpoint_identity(spec))


def load(spec: str, kind: str, reference: ml_collections.ConfigDict | None, cache: str, seed: int = 0,
         step: int | None = None) -> FrozenEncoder:
    """The encoder of `spec` (see the module docstring). `reference`: the CAIP run config of
    the `random` and `siglip2:` baselines; `cache`: a directory this encoder may keep files in;
    `step`: a CAIP workdir's checkpoint (default: the latest)."""
    check_spec(spec)
    if spec == "state":
        return StateOracle()
    if spec == "blind":
        return BlindEncoder()
    if spec.startswith("hf:"):
        path = spec[3:]
        return HFVisionEncoder(f"hf:{_basename(path)}", path, kind)
    if spec == "random" or spec.startswith("siglip2:"):
        return caip_initialised(_reference(spec, reference), kind, siglip2=spec.removeprefix("siglip2:") if spec != "random" else "", seed=seed)
    if _is_caip_export(spec):
        return caip_from_export(spec, kind, cache)
    return caip_from_workdir(spec, kind, step)
