"""A CAIP checkpoint <-> a Hugging Face model directory that `AutoModel` and `AutoProcessor`
load with `trust_remote_code=True` (the code is ours: caip_jax/export/hf/).

The directory holds config.json (with `auto_map`), configuration_caip.py, modeling_caip.py,
processing_caip.py, the tokenizer and preprocessor files, action_stats.json (the checkpoint's
action normalisation, which the processor applies to raw poses), model.safetensors, and
caip_config.json: the whole training config, so that `import_torch` can bring a model
fine-tuned in PyTorch back as a run that `caip-train` continues.
"""
import json
import logging
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np
import safetensors

from caip_jax import config as caip_config
from caip_jax import storage, torch_names, train
from caip_jax.checkpoint import Checkpoints
from caip_jax.export import safetensors_stream
from caip_jax.export.hf.configuration_caip import CAIPConfig
from caip_jax.export.hf.processing_caip import CAIPProcessor
from caip_jax.data.tokenizer import model_proto
from caip_jax.init.siglip2 import replace_towers
from caip_jax.models import layout
from caip_jax.models.caip import tower_size
from caip_jax.models.summary import abstract_params
from caip_jax.models.vit import SIZES

HF_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
MODEL_CODE = ("configuration_caip.py", "modeling_caip.py")  # processing_caip.py: CAIPProcessor.save_pretrained
RUN_CONFIG = "caip_config.json"
PARTS = ("img", "txt", "act", "pool", "t", "b")
READ_BYTES = 256 << 20  # parameters read from the checkpoint at a time


def hf_config(model: ml_collections.ConfigDict) -> dict:
    """The `model` part of a run config -> CAIPConfig's fields."""
    size = tower_size(model)
    return dict(
        hidden_size=size["width"],
        num_hidden_layers=size["depth"],
        intermediate_size=size["mlp_dim"],
        num_attention_heads=size["num_heads"],
        image_size=model.image_size,
        patch_size=size["patch_size"],
        vocab_size=model.text.vocab_size,
        text_length=model.text.length,
        pad_token_id=model.text.pad_id,
        action_horizon=model.action.horizon,
        action_hidden_size=model.action.width,
        action_num_hidden_layers=model.action.depth,
        action_intermediate_size=model.action.mlp_dim,
        action_num_attention_heads=model.action.num_heads,
        pool_num_attention_heads=model.pool.num_heads or size["num_heads"],
        pool_intermediate_size=model.pool.mlp_dim or size["mlp_dim"],
    )


def model_config(hf: CAIPConfig, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model` (a run config's `model` part) with every size of the CAIPConfig `hf`: a variant
    name when a known one fits, explicit sizes otherwise."""
    model = model.copy_and_resolve_references()
    size = dict(width=hf.hidden_size, depth=hf.num_hidden_layers, mlp_dim=hf.intermediate_size, num_heads=hf.num_attention_heads)
    name = next((n for n, s in SIZES.items() if s == size), None)
    model.variant = f"{name or model.variant.split('/')[0]}/{hf.patch_size}"
    for field, value in size.items():
        setattr(model, field, None if name else value)
    model.image_size = hf.image_size
    model.text.update(vocab_size=hf.vocab_size, length=hf.text_length, pad_id=hf.pad_token_id)
    model.action.update(horizon=hf.action_horizon, width=hf.action_hidden_size, depth=hf.action_num_hidden_layers,
                        mlp_dim=hf.action_intermediate_size, num_heads=hf.action_num_attention_heads)
    model.pool.num_heads, model.pool.mlp_dim = hf.pool_num_attention_heads, hf.pool_intermediate_size
    return model


def head_counts(model: ml_collections.ConfigDict) -> dict[str, int]:
    """The head count of each group of attention blocks, which splitting PyTorch's projections
    into Flax's [D, H, K] needs."""
    hf = hf_config(model)
    return dict(tower=hf["num_attention_heads"], action=hf["action_num_attention_heads"], pool=hf["pool_num_attention_heads"])


def torch_tensors(name: str, value) -> dict:
    """One stored CAIP parameter (of one block, or scanned: all blocks stacked) -> its PyTorch
    tensors by state-dict name, one per block."""
    return {torch_names.torch_name(n): torch_names.to_torch(n, v) for n, v in layout.unstack({name: value}).items()}


def _chunks(names: list[str], nbytes: dict[str, int], budget: int):
    chunk, total = [], 0
    for name in names:
        if chunk and total + nbytes[name] > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(name)
        total += nbytes[name]
    if chunk:
        yield chunk


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32", tokenizer: str = "") -> dict:
    """Writes the Hugging Face directory `out` from checkpoint `step` (default: the latest) of
    `workdir`. Reads the parameters a few at a time (never the optimizer state), on any host,
    whatever mesh trained them: memory peaks while the largest tensor is read, compressed and
    decoded (about 0.85x the model for L/16 in float32; benchmarks/RESULTS.md). Per-block and
    scanned checkpoints (model.scan) of the same parameters write the same bytes. `tokenizer`
    overrides the run's data.tokenizer. Returns what was written: step, tensors, bytes, seconds."""
    start = time.perf_counter()
    if dtype not in safetensors_stream.DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(safetensors_stream.DTYPES)}")
    checkpoints = Checkpoints(workdir, asynchronous=False)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint: train first (caip-train) or give another --workdir")
    run = checkpoints.restore_config(step)
    tokenizer = tokenizer or run.data.tokenizer
    try:
        tokenizer_bytes = model_proto(tokenizer)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the run's tokenizer {tokenizer!r} is not there: pass --tokenizer with the sentencepiece model it trained with"
        ) from error
    checkpoints.check_shapes(step, "params", abstract_params(run.model))
    stored = checkpoints.param_metadata(step)
    # Blocks in one order whichever layout stored them, so that both write the same file.
    order = sorted(stored, key=layout.block_order)
    specs = {}  # shapes in PyTorch's layout, from the metadata alone
    for name in order:
        shapes = jax.eval_shape(lambda x: torch_tensors(name, x), jax.ShapeDtypeStruct(stored[name].shape, stored[name].dtype))
        specs.update({n: (s.shape, dtype) for n, s in shapes.items()})
    nbytes = {n: int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for n, m in stored.items()}

    def tensors():
        for chunk in _chunks(order, nbytes, READ_BYTES):
            values = checkpoints.read_params(step, chunk)
            for name in chunk:
                yield from torch_tensors(name, values[name]).items()

    # safetensors and the processor write local files: a remote `out` is written here first, then
    # uploaded whole.
    with storage.staged_directory(out) as local_out, tempfile.TemporaryDirectory() as scratch:
        size = safetensors_stream.save(os.path.join(local_out, "model.safetensors"), specs, tensors(), metadata={"format": "pt"})
        config = CAIPConfig(**hf_config(run.model), architectures=["CAIPModel"], dtype=dtype,
                            auto_map={"AutoConfig": "configuration_caip.CAIPConfig", "AutoModel": "modeling_caip.CAIPModel"})
        config.save_pretrained(local_out)
        for name in MODEL_CODE:
            shutil.copy(os.path.join(HF_CODE, name), local_out)
        tokenizer_file = os.path.join(scratch, "tokenizer.model")
        with open(tokenizer_file, "wb") as f:
            f.write(tokenizer_bytes)
        # None for an imported step 0: the processor then refuses poses, saying why.
        action_stats = checkpoints.restore_json(step, "action_stats")
        CAIPProcessor(tokenizer_file, image_size=run.model.image_size, text_length=run.model.text.length,
                      action_stats=action_stats).save_pretrained(local_out)
        with open(os.path.join(local_out, RUN_CONFIG), "w") as f:
            json.dump(run.to_dict(), f, indent=2)
    checkpoints.close()
    summary = dict(step=step, tensors=len(specs), bytes=size, seconds=time.perf_counter() - start)
    logging.info("exported step %d of %s to %s: %s", step, workdir, out, summary)
    return summary


def import_torch(hf_dir: str, workdir: str, run: ml_collections.ConfigDict | None = None) -> int:
    """Writes step 0 of `workdir` (params and config, marked as an import: `caip-train` starts
    from it with a new optimizer state) from the Hugging Face directory `hf_dir` that `export`
    wrote, fine-tuned or not.

    The run config is `run`, else the directory's caip_config.json, else the defaults; its model
    sizes always come from config.json, and its model.scan chooses the parameter layout (so an
    export and an import with the other model.scan convert a run between the layouts). Every
    tensor must fit, named otherwise. bfloat16 weights become float32 (CAIP's parameters are
    float32). A remote `hf_dir` is downloaded first (transformers and safetensors read local files)."""
    with storage.local_copy(hf_dir) as local:
        return _import_torch(local, workdir, run, source=hf_dir)


def _import_torch(hf_dir: str, workdir: str, run: ml_collections.ConfigDict | None, source: str) -> int:
    if run is None:
        path = os.path.join(hf_dir, RUN_CONFIG)
        run = caip_config.base_config()
        if os.path.isfile(path):
            with open(path) as f:
                run = ml_collections.ConfigDict(json.load(f))
    run = run.copy_and_resolve_references()
    run.model = model_config(CAIPConfig.from_pretrained(hf_dir), run.model)
    checkpoints = Checkpoints(workdir, asynchronous=False)
    if checkpoints.latest_step() is not None:  # before reading the weights, as save_import would
        raise ValueError(f"{workdir} already holds step {checkpoints.latest_step()}: use a new workdir")
    heads = head_counts(run.model)
    flat = {}
    with safetensors.safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            flat.update(torch_names.to_caip({name: f.get_tensor(name).float().numpy()}, heads))
    params = replace_towers(abstract_params(run.model), flat, towers=PARTS, source=f"{hf_dir}/model.safetensors")
    checkpoints.save_import(params, run, source)
    checkpoints.close()
    train.save_config(run, workdir)
    return 0
