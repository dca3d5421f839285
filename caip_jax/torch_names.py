"""CAIP parameter names <-> PyTorch state-dict names, in both directions.

The PyTorch side keeps Hugging Face `SiglipModel`'s names for the image and text towers, so one
table serves the SigLIP 2 import (`init/`: HF -> CAIP) and the PyTorch export of a whole CAIP
(`export/`: CAIP -> HF) and its way back. The action tower (`action_model.`) and the two
pooling stages (`pooling.`) extend the same conventions. CAIP names here are per block
('encoderblock_{i}'): scanned parameters go through `caip_jax.models.layout` first. Layout
differences, per tensor:

- Linear weights are [out, in] in PyTorch, kernels [in, out] in Flax.
- Attention projections are [H*K, D] in PyTorch and [D, H, K] (query/key/value) or [H, K, D]
  (out) in Flax, so the head count is part of the conversion: `heads` maps each group of
  blocks ("tower", "action", "pool") to its head count.
- The patch embedding is a [D, 3, p, p] Conv2d weight, a [p, p, 3, D] Flax kernel.
- Learned positions and the loss scalars carry a leading batch axis of 1 on one side only.
"""
import re
from collections.abc import Mapping

import numpy as np

# Layouts: (to_caip(array, heads), to_torch(array)); only splitting into heads needs the head
# count. Written with array methods only, so that they also run under jax.eval_shape.
_SAME = (lambda w, h: w, lambda k: k)
_LINEAR = (lambda w, h: w.T, lambda k: k.T)
_PATCH = (lambda w, h: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
_BATCHED = (lambda w, h: w[None], lambda k: k[0])  # [N, D] <-> [1, N, D]
_SCALAR = (lambda w, h: w.reshape(()), lambda k: k.reshape(1))
_HEADS_IN = (  # q/k/v: weight [H*K, D] <-> kernel [D, H, K]; bias [H*K] <-> [H, K]
    lambda w, h: w.T.reshape(w.shape[1], h, -1) if w.ndim == 2 else w.reshape(h, -1),
    lambda k: k.reshape(k.shape[0], -1).T if k.ndim == 3 else k.reshape(-1),
)
_HEADS_OUT = (lambda w, h: w.T.reshape(h, -1, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)


def _norm(torch_name, caip_name):
    return {f"{torch_name}.weight": (f"{caip_name}/scale", _SAME), f"{torch_name}.bias": (f"{caip_name}/bias", _SAME)}


def _dense(torch_name, caip_name):
    return {f"{torch_name}.weight": (f"{caip_name}/kernel", _LINEAR), f"{torch_name}.bias": (f"{caip_name}/bias", _SAME)}


def _attention(torch_name):
    caip = "MultiHeadDotProductAttention_0"
    rules = {}
    for torch_part, caip_part in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rules[f"{torch_name}.{torch_part}.weight"] = (f"{caip}/{caip_part}/kernel", _HEADS_IN)
        rules[f"{torch_name}.{torch_part}.bias"] = (f"{caip}/{caip_part}/bias", _HEADS_IN)
    rules[f"{torch_name}.out_proj.weight"] = (f"{caip}/out/kernel", _HEADS_OUT)
    rules[f"{torch_name}.out_proj.bias"] = (f"{caip}/out/bias", _SAME)
    return rules


_MLP = {**_dense("mlp.fc1", "MlpBlock_0/Dense_0"), **_dense("mlp.fc2", "MlpBlock_0/Dense_1")}
# Inside one encoder layer (HF SiglipEncoderLayer) and one attention pool (HF's MAP head).
_ENCODER_LAYER = {**_norm("layer_norm1", "LayerNorm_0"), **_attention("self_attn"), **_norm("layer_norm2", "LayerNorm_1"), **_MLP}
_ATTENTION_POOL = {**_attention("attention"), **_norm("layernorm", "LayerNorm_0"), **_MLP}
_PROBE = {"probe": ("probe", _SAME)}

# (torch prefix, CAIP prefix, rules inside, head group); {} stands for a layer index.
_GROUPS = (
    ("vision_model.encoder.layers.{}.", "img/Transformer/encoderblock_{}/", _ENCODER_LAYER, "tower"),
    ("vision_model.head.", "img/MAPHead_0/", {**_ATTENTION_POOL, **_PROBE}, "tower"),
    ("text_model.encoder.layers.{}.", "txt/Encoder_0/encoderblock_{}/", _ENCODER_LAYER, "tower"),
    ("action_model.encoder.layers.{}.", "act/Transformer/encoderblock_{}/", _ENCODER_LAYER, "action"),
    ("pooling.cross_attention.", "pool/CrossAttentionPool_0/", _ATTENTION_POOL, "pool"),
    ("pooling.head.", "pool/MAPHead_0/", {**_ATTENTION_POOL, **_PROBE}, "pool"),
)

# Whole tensors outside the blocks: torch name -> (CAIP name, layout).
_SINGLE = {
    "vision_model.embeddings.patch_embedding.weight": ("img/embedding/kernel", _PATCH),
    "vision_model.embeddings.patch_embedding.bias": ("img/embedding/bias", _SAME),
    "vision_model.embeddings.position_embedding.weight": ("img/pos_embedding", _BATCHED),
    **_norm("vision_model.post_layernorm", "img/Transformer/encoder_norm"),
    "text_model.embeddings.token_embedding.weight": ("txt/Embed_0/embedding", _SAME),
    "text_model.embeddings.position_embedding.weight": ("txt/pos_embedding", _BATCHED),
    **_norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm"),
    **_dense("text_model.head", "txt/head"),
    **_dense("action_model.embedding", "act/embedding"),
    "action_model.position_embedding.weight": ("act/pos_embedding", _BATCHED),
    "action_model.cls": ("act/cls", _SAME),
    **_norm("action_model.final_layer_norm", "act/Transformer/encoder_norm"),
    **_dense("action_model.head", "act/head"),
    "logit_scale": ("t", _SCALAR),  # log-space in both, as big_vision's t
    "logit_bias": ("b", _SCALAR),
}

_BY_TORCH = {name: (caip, layout, None) for name, (caip, layout) in _SINGLE.items()}
for torch_prefix, caip_prefix, inner, group in _GROUPS:
    for torch_name, (caip_name, layout) in inner.items():
        _BY_TORCH[torch_prefix + torch_name] = (caip_prefix + caip_name, layout, group)
_BY_CAIP = {caip: (name, layout, group) for name, (caip, layout, group) in _BY_TORCH.items()}

_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)|(?<=encoderblock_)\d+(?=/)")


def _lookup(name: str, table: dict, side: str) -> tuple[str, tuple, str | None]:
    """-> (the other side's name, layout, head group); the layer index carried across."""
    index = _LAYER_INDEX.findall(name)
    rule = table.get(_LAYER_INDEX.sub("{}", name))
    if rule is None:
        raise KeyError(f"{name!r} is not a {side} tensor of CAIP")
    other, layout, group = rule
    return other.format(*index), layout, group


def _heads(group: str | None, heads: Mapping[str, int], name: str) -> int:
    if group is None:
        return 0
    if group not in heads:
        raise ValueError(f"{name}: converting it needs the {group!r} head count, which was not given")
    return heads[group]


def to_caip(state: Mapping[str, np.ndarray], heads: Mapping[str, int]) -> dict[str, np.ndarray]:
    """A PyTorch state dict (numpy arrays) -> flat CAIP parameters ('img/embedding/kernel', 't').
    Tensors that no rule knows are refused by name: a silently dropped tensor would leave a
    tower half-initialised."""
    flat, unknown = {}, []
    for name, value in state.items():
        try:
            caip, layout, group = _lookup(name, _BY_TORCH, "PyTorch")
        except KeyError:
            unknown.append(name)
            continue
        flat[caip] = layout[0](np.asarray(value), _heads(group, heads, name))
    if unknown:
        raise ValueError(f"Tensors with no place in CAIP: {unknown}")
    return flat


def torch_name(name: str) -> str:
    """A flat CAIP parameter name -> its PyTorch state-dict name."""
    return _lookup(name, _BY_CAIP, "Flax")[0]


def to_torch(name: str, value):
    """One flat CAIP parameter -> the tensor in PyTorch's layout (under `torch_name(name)`).
    Works on a jax.ShapeDtypeStruct under jax.eval_shape too, to learn the shape alone."""
    return _lookup(name, _BY_CAIP, "Flax")[1][1](value)
