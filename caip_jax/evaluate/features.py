"""A frozen CAIP encoder over a record set: features for probes and retrieval, and the pooling
attention for saliency maps. Batches are sharded over the devices (and processes) present, as
in training; the results come back whole to every process.

Feature kinds, each [n, D]:
    image_pooled      the text-conditioned image embedding (what the loss sees)
    image_map         the image tower's own MAP head (SigLIP's image embedding; no text)
    patch_mean        the mean of the patch features
    action_embedding  the action tower's embedding of the record's action chunk
"""
import dataclasses
import logging
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from caip_jax import device_prep, run_state, sharding
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import pipeline
from caip_jax.data import records as records_module
from caip_jax.data.tokenizer import Tokenizer
from caip_jax.evaluate import saliency as saliency_maps

KINDS = ("image_pooled", "image_map", "patch_mean", "action_embedding")
INPUT_KEYS = ("image", "jitter", "text", "translation", "translation_scale", "rotation", "valid", "skipped")


@dataclasses.dataclass
class Encoder:
    """A CAIP model with its parameters placed on the mesh, and the action normalisation of
    its training data (mean, std [2, 21, 9]: the mixture's, or the first source's)."""

    config: ml_collections.ConfigDict
    run: run_state.Setup
    params: Any
    mean: np.ndarray
    std: np.ndarray
    name: str = "trained"


def _with_mesh(config: ml_collections.ConfigDict, mesh: dict | None) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.mesh = ml_collections.ConfigDict(mesh or dict(data=1, fsdp=-1, tensor=1))
    return config


def from_checkpoint(workdir: str, step: int | None = None, mesh: dict | None = None) -> Encoder:
    """The encoder of checkpoint `step` (default: the latest) of `workdir`, restored onto
    `mesh` (default: parameters over every device, fsdp), whatever mesh trained it."""
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint: train first or give another --workdir")
    config = _with_mesh(checkpoints.restore_config(step), mesh)
    run = run_state.setup(config)
    params = checkpoints.restore(step, run_state.abstract_params(run))["params"]
    stored = checkpoints.restore_json(step, "action_stats")
    checkpoints.close()
    # The action space the model was trained in: its checkpoint's statistics (an imported step
    # has none yet: the record sets' own).
    mean, std = run_state.stats_arrays(stored) if stored else run_state.action_stats(config)[1:]
    return Encoder(config, run, params, mean[0], std[0], name=f"step {step}")


def initialised(config: ml_collections.ConfigDict, siglip2: str = "", seed: int = 0, mesh: dict | None = None) -> Encoder:
    """The baselines: `config`'s model at random init, or with SigLIP 2's towers from `siglip2`
    (the action tower and pooling stay random), normalised as the trained model."""
    config = _with_mesh(config, mesh)
    run = run_state.setup(config)
    params = run_state.initial_params(run, seed, siglip2)
    _, mean, std = run_state.action_stats(config)
    return Encoder(config, run, params, mean[0], std[0], name="siglip2 init" if siglip2 else "random init")


def _forward(encoder: Encoder):
    """(params, batch) -> features of every kind, the normalised action chunk [B, T, 2, 21, 9],
    its mask [B, T, 2], and `skipped` [B] (1: the record failed, the next one stands in)."""
    config, model = encoder.config, encoder.run.model

    def forward(params, batch):
        batch = dict(batch, source_index=jnp.zeros(batch["text"].shape[0], jnp.int32))
        action, action_mask = device_prep.action_chunks(
            batch, config.model.action.horizon, config.data.delta, encoder.mean[None], encoder.std[None]
        )
        image = device_prep.color_jitter(batch["image"], batch["jitter"])
        out = model.apply({"params": params}, image, batch["text"], action, action_mask)
        return dict(
            image_pooled=out["image_pooled"],
            image_map=out["image_map"],
            patch_mean=out["patch_features"].mean(axis=1),
            action_embedding=out["action_embedding"],
            action=action,
            action_mask=action_mask,
            skipped=batch["skipped"],  # replicated out, so every process knows every failed row
        )

    return forward


def _local_indices(count: int, batch_size: int) -> list[int]:
    """This process's rows of every global batch over `count` records; the last batch is
    filled up with the last record (its copies are dropped after)."""
    local = batch_size // jax.process_count()
    padded = -(-count // batch_size) * batch_size
    rows = [k + jax.process_index() * local + j for k in range(0, padded, batch_size) for j in range(local)]
    return [min(i, count - 1) for i in rows]


def extract(encoder: Encoder, records: str, batch_size: int = 256, max_records: int | None = None,
            workers: int = 0) -> dict[str, np.ndarray]:
    """Features of the first `max_records` (default: all) records of `records`, in record order,
    without augmentation: every kind [n, D], `action` [n, T, 2, 21, 9] (normalised) and
    `action_mask` [n, T, 2] (the regression targets), `record_index` [n] and the records'
    `metadata`. A record that cannot be read or decoded is left out (and logged): its row
    would otherwise hold the next record's features under its own labels. Each process
    decodes its rows of every batch; every process gets all the features.

    `batch_size` is global (over all processes) and must divide over the devices."""
    config = encoder.config
    devices = len(jax.devices())
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} does not divide over the {devices} devices: use a multiple of {devices}")
    model = config.model
    preprocess = pipeline.Preprocess(config.data.tokenizer, model.image_size, model.text.length, model.action.horizon)
    samples = pipeline.eval_samples(records, preprocess)
    count = len(samples) if max_records is None else min(max_records, len(samples))
    indices = _local_indices(count, batch_size)
    local_batch = batch_size // jax.process_count()
    dataset = grain.MapDataset.source(indices).map(samples.__getitem__).batch(local_batch)
    mesh = encoder.run.mesh
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        forward = jax.jit(_forward(encoder), in_shardings=(encoder.run.param_shardings, batch_sharding),
                          out_shardings=replicated)
        parts, start = [], time.perf_counter()
        for local in tqdm.tqdm(pipeline.iterate(dataset, workers), total=len(dataset), unit="batch",
                               desc=f"features ({encoder.name})", disable=jax.process_index() != 0):
            inputs = {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in INPUT_KEYS}
            parts.append(jax.device_get(forward(encoder.params, inputs)))
    out = {k: np.concatenate([p[k] for p in parts])[:count] for k in parts[0]}
    skipped = out.pop("skipped")
    kept, failed = np.flatnonzero(skipped == 0), np.flatnonzero(skipped).tolist()
    logging.info("%s: %d records of %s in %.1f s", encoder.name, count, records, time.perf_counter() - start)
    if failed:
        logging.warning("%s: left out %d of %d records that could not be read or decoded (record indices %s; "
                        "their errors are logged above)", records, len(failed), count, failed[:20])
    out = {k: v[kept] for k, v in out.items()}
    return dict(out, record_index=kept, **metadata(records, kept))


def metadata(records: str, indices: np.ndarray) -> dict:
    """episode_id [n], frame_index [n] and labels (key -> [n] str; "" where a record lacks the
    key) of the records at `indices` [n], read without decoding images."""
    dataset = pipeline.record_dataset(records)
    rows = [records_module.decode(r) if isinstance(r, bytes) else r for r in (dataset[int(i)] for i in indices)]
    keys = sorted({k for row in rows for k in row.get("labels", {})})
    return dict(
        episode_id=np.array([row["episode_id"] for row in rows]),
        frame_index=np.array([row["frame_index"] for row in rows]),
        labels={k: np.array([row.get("labels", {}).get(k, "") for row in rows]) for k in keys},
    )


def saliency(encoder: Encoder, images: np.ndarray, texts: list[str]) -> np.ndarray:
    """uint8 images [B, S, S, 3] at the model's size and their instructions -> per-patch
    saliency [B, N] (`saliency.patch_saliency` of the two pooling stages' attention)."""
    model = encoder.config.model
    text = Tokenizer(encoder.config.data.tokenizer, model.text.length).encode(texts)

    def attention(params, images, text):
        image = device_prep.color_jitter(images, jnp.ones((len(images), 3)))
        out = encoder.run.model.apply({"params": params}, image, text, return_attention=True,
                                      method="encode_image_text")
        return saliency_maps.patch_saliency(out["stage1_attention"], out["stage2_attention"])

    with jax.set_mesh(encoder.run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return np.asarray(jax.jit(attention)(encoder.params, images, text))


def saliency_tiles(encoder: Encoder, frames: list, texts: list[str], display: int = 256) -> list[np.ndarray]:
    """Frames (image files, JPEG bytes or PIL images) and their instructions -> one uint8
    [display, display, 3] tile each: the frame as the model sees it, its saliency overlaid."""
    images = saliency_maps.load_frames(frames, encoder.config.model.image_size)
    weights = saliency(encoder, images, texts)
    return [saliency_maps.overlay_patches(image, w, display) for image, w in zip(images, weights)]
