"""The two parameter layouts of the towers' encoders (see `common.Encoder`), and the pure
functions that convert between them.

Per block: '.../encoderblock_{i}/MlpBlock_0/Dense_0/kernel' [D, M], one entry per block i;
scanned: '.../encoderblock/MlpBlock_0/Dense_0/kernel' [depth, D, M], the blocks stacked along a
leading axis. These are big_vision's two npz layouts. The model runs in one of them
(`model.scan`); the conversions are for the edges only (the SigLIP 2 import, the PyTorch export
and import), on flat parameter dicts with '/'-joined names. Other entries pass through as they are.
"""
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_BLOCK = re.compile(r"/encoderblock_(\d+)/")
_STACKED = "/encoderblock/"


def is_scanned(names: Iterable[str]) -> bool:
    """Whether flat parameter `names` hold stacked blocks ('.../encoderblock/...')."""
    return any(_STACKED in name for name in names)


def unstack(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> per block: each '.../encoderblock/...' [depth, ...] becomes `depth` entries
    '.../encoderblock_{i}/...' [...] (views, no copy; tracers under jax.eval_shape too)."""
    out = {}
    for name, value in flat.items():
        if _STACKED not in name:
            out[name] = value
            continue
        for i in range(value.shape[0]):
            out[name.replace(_STACKED, f"/encoderblock_{i}/", 1)] = value[i]
    return out


def stack(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per block -> scanned: the entries '.../encoderblock_{i}/...' of one name become one
    '.../encoderblock/...' [depth, ...] array. Blocks must run 0..depth-1 with no gap: a
    missing block is refused by name rather than stacked into the wrong depth."""
    out, blocks = {}, {}
    for name, value in flat.items():
        match = _BLOCK.search(name)
        if match is None:
            out[name] = value
            continue
        stacked = name[: match.start()] + _STACKED + name[match.end():]
        blocks.setdefault(stacked, {})[int(match.group(1))] = value
    for stacked, by_index in blocks.items():
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if missing:
            names = [stacked.replace(_STACKED, f"/encoderblock_{i}/", 1) for i in missing]
            raise ValueError(f"cannot stack {stacked}: blocks missing: {names}")
        out[stacked] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return out


def to_layout(flat: Mapping[str, Any], scanned: bool) -> dict[str, Any]:
    """`flat` in the scanned or the per-block layout, whichever it holds now."""
    return stack(unstack(flat)) if scanned else unstack(flat)


def block_order(name: str) -> tuple[str, int]:
    """A sort key under which per-block and scanned names come in one order: blocks of one
    tensor together, by index, where the scanned tensor that holds them would sort."""
    match = _BLOCK.search(name)
    if match is None:
        return name, -1
    return name[: match.start()] + _STACKED + name[match.end():], int(match.group(1))
