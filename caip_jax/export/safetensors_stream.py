"""Writes a .safetensors file one tensor at a time, so that a model larger than memory can be
exported: the safetensors library only saves whole dicts held in memory.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range in the data that follows, then
the raw little-endian bytes. Knowing every shape in advance, we write the header first and
stream the data after it.
"""
import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}


def save(path: str, specs: Mapping[str, tuple[tuple[int, ...], str]], tensors: Iterable[tuple[str, np.ndarray]],
         metadata: Mapping[str, str] | None = None) -> int:
    """Writes `tensors` ((name, array) pairs, in the order of `specs`: name -> (shape, dtype
    name in DTYPES)) to `path`, atomically (a partly written file never has the final name).
    Arrays are cast to their spec's dtype; a name, order or shape that differs from `specs` is
    an error naming the tensor. Returns the file size in bytes."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        code, np_dtype = DTYPES[dtype]
        size = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[name] = dict(dtype=code, shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    header["__metadata__"] = dict(metadata or {})
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = path + ".partial"
    written = iter(specs.items())
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, array in tensors:
            expected, (shape, dtype) = next(written, (None, (None, None)))
            array = np.asarray(array)
            if name != expected or tuple(array.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} {tuple(array.shape)} arrived where {expected!r} {shape} was declared")
            array = np.ascontiguousarray(array, dtype=DTYPES[dtype][1].newbyteorder("<"))
            f.write(array.reshape(-1).view(np.uint8).data)  # no copy when no cast was needed
        missing = [name for name, _ in written]
        if missing:
            raise ValueError(f"declared but never written: {missing}")
    os.replace(partial, path)
    return os.path.getsize(path)
