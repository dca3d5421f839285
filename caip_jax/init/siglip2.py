"""SigLIP 2 weights -> CAIP's `img/`, `txt/`, `t`, `b`.

Two sources, both read by `load_siglip2` into one flat naming ('img/embedding/kernel', 't'):

- big_vision `.npz` checkpoints (gs://big_vision/siglip2/*.npz, the `-jax` Hugging Face repos):
  flat keys joined with '/', `params/img/...`, `params/txt/...`, `params/t`, `params/b`. The
  names are already CAIP's (CAIP keeps big_vision's); files saved with `scan=True` hold each
  tower's blocks as one `encoderblock/...` array with a leading depth axis, unstacked here.
- Hugging Face directories of the fixed-resolution releases (`SiglipModel`, config.json +
  model.safetensors), converted by the name table of `caip_jax.torch_names` (which the
  PyTorch export shares); the vision MAP head's `nn.MultiheadAttention` packs query, key and
  value into one `in_proj_weight`, split here first.

Both give the per-block layout; `replace_towers` puts them into a CAIP parameter tree of either
layout (`model.scan`), and `init_from_siglip2` also resizes the image position grid when the
config's resolution differs from the checkpoint's.
"""
import json
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np
import safetensors.numpy
import scipy.ndimage
from flax import traverse_util

from caip_jax import storage, torch_names
from caip_jax.models import layout


def _split_packed_attention(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unpacks `nn.MultiheadAttention`'s `in_proj_{weight,bias}` into q/k/v_proj entries."""
    out = {}
    for name, value in state.items():
        match = re.fullmatch(r"(.*\.attention\.)in_proj_(weight|bias)", name)
        if match is None:
            out[name] = value
            continue
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{match.group(1)}{part}.{match.group(2)}"] = chunk
    return out


def from_hf_state_dict(state: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """A `SiglipModel` state dict (numpy arrays) -> flat CAIP parameters named like
    'img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', 't', 'b'.

    `num_heads` is the towers' head count (HF configs call it `num_attention_heads`). Tensors
    that no rule knows are refused by name: a silently dropped tensor would leave a tower
    half-initialised.
    """
    return torch_names.to_caip(_split_packed_attention(state), {"tower": num_heads})


def replace_towers(params: Mapping, flat: Mapping[str, np.ndarray], towers=("img", "txt"),
                   source: str = "The SigLIP checkpoint") -> dict:
    """`params` (a nested CAIP tree) with every tensor of `flat` put in place, converted to the
    layout of `params` (per block or scanned, see `caip_jax.models.layout`) whichever `flat` has.

    Every leaf under `towers` must be given, every given tensor must exist in `params` with the
    same shape; otherwise the error names each offending tensor. Other leaves (the action
    tower, the pooling) are kept as they are.
    """
    current = traverse_util.flatten_dict(params, sep="/")
    try:
        flat = layout.to_layout(flat, layout.is_scanned(current))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    missing = sorted(k for k in current if k.split("/")[0] in towers and k not in flat)
    unexpected = sorted(k for k in flat if k not in current)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(np.shape(v))} vs model {tuple(np.shape(current[k]))}"
        for k, v in flat.items()
        if k in current and np.shape(v) != np.shape(current[k])
    )
    problems = [
        f"{label}: {listed}"
        for label, listed in (
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
            ("shape differs", mismatched),
        )
        if listed
    ]
    if problems:
        raise ValueError(f"{source} does not fit the CAIP config. " + "; ".join(problems))
    current.update({k: np.asarray(v, dtype=current[k].dtype) for k, v in flat.items()})
    return traverse_util.unflatten_dict(current, sep="/")


# Top-level names of the SigLIP parameters CAIP takes over; anything else is refused by name.
_SIGLIP_PARTS = ("img", "txt", "t", "b")


def load_npz(path: str) -> dict[str, np.ndarray]:
    """A big_vision SigLIP (2) `.npz` -> flat CAIP parameters ('img/...', 'txt/...', 't', 'b').

    As big_vision's `utils.load_params`: the weights are the `params/...` entries when there are
    any (other entries, such as a training checkpoint's optimizer state, are not weights and are
    skipped), else every entry. Weights outside img/, txt/, t and b (a classifier head, say) are
    refused by name: CAIP has no place for them, and dropping them silently would hide that the
    file is some other model. `t` and `b`, stored with shape (1,), become scalars.
    """
    with np.load(path, allow_pickle=False) as data:
        prefix = "params/" if any(k.startswith("params/") for k in data.files) else ""
        params = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    unknown = sorted(k for k in params if k.split("/")[0] not in _SIGLIP_PARTS)
    if unknown:
        raise ValueError(
            f"{path}: tensors outside img/, txt/, t and b that CAIP has no place for: {unknown}. "
            "Use a SigLIP (image-text) checkpoint, or remove these entries from the file"
        )
    flat = layout.unstack(params)
    return {k: v.reshape(()) if k in ("t", "b") and v.size == 1 else v for k, v in flat.items()}


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face directory: model.safetensors, or the shards its
    model.safetensors.index.json lists (large models are saved sharded)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{directory} has no model.safetensors (nor model.safetensors.index.json): save the "
            "model with save_pretrained(), which writes safetensors"
        )
    state = {}
    for name in files:
        state.update(safetensors.numpy.load_file(os.path.join(directory, name)))
    return state


def load_hf(directory: str) -> dict[str, np.ndarray]:
    """A Hugging Face `SiglipModel` directory (config.json + safetensors) -> flat CAIP parameters.

    The head count comes from config.json (through transformers' config class, which fills
    the fields a config leaves at their defaults); both towers must share it, as in SigLIP 2.
    """
    import transformers  # a second to import: only a Hugging Face checkpoint needs it, not every caip-train start

    config = transformers.AutoConfig.from_pretrained(directory)
    if config.model_type != "siglip":
        raise ValueError(
            f"{directory}/config.json has model_type {config.model_type!r}: CAIP imports the "
            "fixed-resolution SigLIP 2 releases, model_type 'siglip' (`SiglipModel`); NaFlex "
            "checkpoints ('siglip2') have another image tower"
        )
    heads = {config.vision_config.num_attention_heads, config.text_config.num_attention_heads}
    if len(heads) != 1:
        raise ValueError(
            f"{directory}/config.json: the vision and text towers have different head counts "
            f"{sorted(heads)}; CAIP's towers share one (model.num_heads)"
        )
    return from_hf_state_dict(_read_safetensors(directory), num_heads=heads.pop())


def load_siglip2(path: str) -> dict[str, np.ndarray]:
    """Flat CAIP parameters from a big_vision `.npz` file or a Hugging Face directory, local or
    remote (downloaded first: numpy and safetensors read local files)."""
    with storage.local_copy(path) as local:
        if os.path.isfile(local) and local.endswith(".npz"):
            return load_npz(local)
        if os.path.isfile(os.path.join(local, "config.json")):
            return load_hf(local)
    raise ValueError(
        f"{path!r} is neither a big_vision .npz file nor a Hugging Face directory holding "
        "config.json and model.safetensors: pass one of those"
    )


def resize_pos_embedding(posemb: np.ndarray, grid: int) -> np.ndarray:
    """Learned positions of a square patch grid [1, g*g, D] -> [1, grid*grid, D].

    Linear interpolation along each grid axis with the corner positions kept exactly
    (align_corners=True) and no antialiasing when shrinking: big_vision's
    `vit.resample_posemb` (scipy.ndimage.zoom, order=1), which is how SigLIP checkpoints
    change resolution there. (jax.image.resize's 'bilinear' aligns pixel centres instead,
    and antialiases when shrinking, so it gives other values.)
    """
    _, length, width = posemb.shape
    old = math.isqrt(length)
    if old * old != length:
        raise ValueError(f"img/pos_embedding has {length} positions, which is not a square patch grid")
    zoom = grid / old
    resized = scipy.ndimage.zoom(posemb.reshape(old, old, width), (zoom, zoom, 1), order=1)
    return resized.reshape(1, grid * grid, width)


def _fit_positions(flat: Mapping[str, np.ndarray], params: Mapping) -> dict[str, np.ndarray]:
    """`flat` with the image position grid resized to the model's (with a warning); a text
    length that differs from the model's is an error, since text positions do not interpolate."""
    flat = dict(flat)
    image, target = flat.get("img/pos_embedding"), np.shape(params["img"]["pos_embedding"])
    if image is not None and image.shape[1] != target[1]:
        old, new = math.isqrt(image.shape[1]), math.isqrt(target[1])
        flat["img/pos_embedding"] = resize_pos_embedding(image, new)
        warnings.warn(
            f"img/pos_embedding: resized the checkpoint's {old}x{old} patch grid to the model's "
            f"{new}x{new} (linear interpolation, corners aligned, as big_vision's resample_posemb)"
        )
    text, target = flat.get("txt/pos_embedding"), np.shape(params["txt"]["pos_embedding"])
    if text is not None and text.shape[1] != target[1]:
        raise ValueError(
            f"txt/pos_embedding: the checkpoint has {text.shape[1]} text positions, the model "
            f"{target[1]}: set model.text.length={text.shape[1]} (SigLIP 2 was trained with 64)"
        )
    return flat


def init_from_siglip2(params: Mapping, path: str, *, load_loss_scalars: bool = False) -> dict:
    """`params` (a nested CAIP tree, per block or scanned) with `img/` and `txt/` taken from the
    SigLIP 2 checkpoint at `path` (a big_vision .npz or a Hugging Face directory); the action
    tower and the pooling keep their values.

    `t` and `b` keep theirs too (model.t_init, model.b_init: the SigLIP paper's start for a new
    pairing, t = log 10, b = -10), since SigLIP 2's were learned for image-text pairs, not for
    image-action ones; `load_loss_scalars` takes SigLIP 2's instead
    (config.init.siglip2_logit_scalars).

    An image position grid of another size is resized to the model's (with a warning). Missing,
    unexpected or mis-shaped tensors are refused by name (see `replace_towers`).
    """
    flat = _fit_positions(load_siglip2(path), params)
    parts = _SIGLIP_PARTS if load_loss_scalars else ("img", "txt")
    flat = {k: v for k, v in flat.items() if k.split("/")[0] in parts}
    return replace_towers(params, flat, towers=parts)
