"""SigLIP 2 weights in Hugging Face's `SiglipModel` layout -> CAIP's `img/`, `txt/`, `t`, `b`.

The fixed-resolution SigLIP 2 releases on Hugging Face use `SiglipModel`; their tensors map
one to one onto big_vision's names, which CAIP keeps. PyTorch Linear weights are [out, in]
(Flax kernels are [in, out]); attention projections are split into heads; the vision MAP head's
`nn.MultiheadAttention` packs query, key and value into one `in_proj_weight`.
"""
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util


def _linear(w):
    return w.T


def _same(w):
    return w


def _to_heads(heads):
    """[H*K, D] projection weight -> [D, H, K] kernel; [H*K] bias -> [H, K]."""
    return lambda w: w.T.reshape(w.shape[1], heads, -1) if w.ndim == 2 else w.reshape(heads, -1)


def _from_heads(heads):
    """[D, H*K] output projection weight -> [H, K, D] kernel."""
    return lambda w: w.T.reshape(heads, -1, w.shape[0])


def _block_rules(heads):
    """HF names inside an encoder layer or MAP head -> (big_vision name, converter)."""
    rules = {
        "layer_norm1": "LayerNorm_0",
        "layer_norm2": "LayerNorm_1",
        "layernorm": "LayerNorm_0",  # the MAP head's
        "mlp.fc1": "MlpBlock_0/Dense_0",
        "mlp.fc2": "MlpBlock_0/Dense_1",
    }
    out = {}
    for hf, bv in rules.items():
        out[f"{hf}.weight"] = (f"{bv}/kernel", _linear) if "mlp" in hf else (f"{bv}/scale", _same)
        out[f"{hf}.bias"] = (f"{bv}/bias", _same)
    attention = "MultiHeadDotProductAttention_0"
    for hf_prefix in ("self_attn.", "attention."):
        for hf, bv in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            out[f"{hf_prefix}{hf}.weight"] = (f"{attention}/{bv}/kernel", _to_heads(heads))
            out[f"{hf_prefix}{hf}.bias"] = (f"{attention}/{bv}/bias", _to_heads(heads))
        out[f"{hf_prefix}out_proj.weight"] = (f"{attention}/out/kernel", _from_heads(heads))
        out[f"{hf_prefix}out_proj.bias"] = (f"{attention}/out/bias", _same)
    out["probe"] = ("probe", _same)
    return out


# Whole-tower tensors: HF name -> (big_vision name, converter).
_TOWER_RULES = {
    "vision_model.embeddings.patch_embedding.weight": (
        "img/embedding/kernel",
        lambda w: w.transpose(2, 3, 1, 0),  # [D, 3, p, p] -> [p, p, 3, D]
    ),
    "vision_model.embeddings.patch_embedding.bias": ("img/embedding/bias", _same),
    "vision_model.embeddings.position_embedding.weight": ("img/pos_embedding", lambda w: w[None]),
    "vision_model.post_layernorm.weight": ("img/Transformer/encoder_norm/scale", _same),
    "vision_model.post_layernorm.bias": ("img/Transformer/encoder_norm/bias", _same),
    "text_model.embeddings.token_embedding.weight": ("txt/Embed_0/embedding", _same),
    "text_model.embeddings.position_embedding.weight": ("txt/pos_embedding", lambda w: w[None]),
    "text_model.final_layer_norm.weight": ("txt/Encoder_0/encoder_norm/scale", _same),
    "text_model.final_layer_norm.bias": ("txt/Encoder_0/encoder_norm/bias", _same),
    "text_model.head.weight": ("txt/head/kernel", _linear),
    "text_model.head.bias": ("txt/head/bias", _same),
    "logit_scale": ("t", lambda w: w.reshape(())),  # already log-space, like big_vision's t
    "logit_bias": ("b", lambda w: w.reshape(())),
}

# Prefixes of per-block tensors: HF regex -> big_vision prefix (group 1 is the layer index).
_BLOCK_PREFIXES = (
    (r"vision_model\.encoder\.layers\.(\d+)\.", "img/Transformer/encoderblock_{}/"),
    (r"text_model\.encoder\.layers\.(\d+)\.", "txt/Encoder_0/encoderblock_{}/"),
    (r"vision_model\.head\.", "img/MAPHead_0/"),
)


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
    block_rules = _block_rules(num_heads)
    flat, unknown = {}, []
    for name, value in _split_packed_attention(state).items():
        value = np.asarray(value)
        if name in _TOWER_RULES:
            target, convert = _TOWER_RULES[name]
            flat[target] = convert(value)
            continue
        for pattern, prefix in _BLOCK_PREFIXES:
            match = re.match(pattern, name)
            if match and name[match.end():] in block_rules:
                target, convert = block_rules[name[match.end():]]
                flat[prefix.format(*match.groups()) + target] = convert(value)
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Unexpected tensors in the SigLIP checkpoint, not mapped to CAIP: {unknown}")
    return flat


def replace_towers(params: Mapping, flat: Mapping[str, np.ndarray], towers=("img", "txt")) -> dict:
    """`params` (a nested CAIP tree) with every tensor of `flat` put in place.

    Every leaf under `towers` must be given, every given tensor must exist in `params` with the
    same shape; otherwise the error names each offending tensor. Other leaves (the action
    tower, the pooling) are kept as they are.
    """
    current = traverse_util.flatten_dict(params, sep="/")
    missing = sorted(k for k in current if k.split("/")[0] in towers and k not in flat)
    unexpected = sorted(k for k in flat if k not in current)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(np.shape(v))} vs model {tuple(np.shape(current[k]))}"
        for k, v in flat.items()
        if k in current and np.shape(v) != np.shape(current[k])
    )
    problems = [
        f"{label}: {names}"
        for label, names in (
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
            ("shape differs", mismatched),
        )
        if names
    ]
    if problems:
        raise ValueError("The SigLIP checkpoint does not fit the CAIP config. " + "; ".join(problems))
    current.update({k: np.asarray(v, dtype=np.asarray(current[k]).dtype) for k, v in flat.items()})
    return traverse_util.unflatten_dict(current, sep="/")
