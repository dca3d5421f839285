"""Record sets: ArrayRecord shards of samples, one sample per anchor frame, plus JSON beside them.

A record set directory holds

    records-00000-of-00004.array_record ...   the samples (msgpack, see `Sample`)
    stats.json                                action mean/std per delta mode (caip_jax.data.stats)
    summary.json                              what the conversion did: counts, skipped episodes

A sample (one record) is a msgpack map:

    image        bytes    the anchor frame as JPEG (short side `jpeg_short_side`, default 288)
    text         str      the instruction
    poses        map      the T+1 camera-frame poses, compressed (caip_jax.actions.compress_poses)
    valid        [T+1, 2] bool hand validity at the anchor and the T future steps
    source, episode_id, view (head|wrist): str;  frame_index: int (anchor's frame in the video)
    intrinsics   [3, 3]   float32, pixels of the stored JPEG (NaN when the source has none)
    labels       map str -> str (for probes; e.g. the demo world's target, hand, verb)
"""
import json
import os

import msgpack
import numpy as np
from array_record.python import array_record_module
from etils import epath

# One record per chunk: cheap random access for grain. Uncompressed: zstd (the default) saves
# only ~10% (JPEG bytes do not compress) and costs ~30 us a read, ~4% of a sample's host time.
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_PATTERN = "records-{index:05d}-of-{count:05d}.array_record"


_NDARRAY = 1  # msgpack extension type of a numpy array: dtype, shape and raw bytes


def _pack_array(value):
    if isinstance(value, np.ndarray):
        header = msgpack.packb((value.dtype.str, value.shape))
        return msgpack.ExtType(_NDARRAY, header + np.ascontiguousarray(value).tobytes())
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def _unpack_array(code: int, data: bytes):
    unpacker = msgpack.Unpacker(use_list=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    return np.frombuffer(data, dtype, offset=unpacker.tell()).reshape(shape)


def encode(sample: dict) -> bytes:
    """A sample (str keys; str, bytes, int, float, numpy arrays, nested maps) -> msgpack bytes.
    Plain msgpack rather than flax's, so that data workers never import JAX."""
    return msgpack.packb(sample, default=_pack_array)


def decode(record: bytes) -> dict:
    return msgpack.unpackb(record, ext_hook=_unpack_array)


def shard_paths(directory: str) -> list[str]:
    """The record shards of a record set, in order; an error if there are none. `directory`
    may be remote (gs://, with etils' file-system extras installed): training reads shards
    where they lie."""
    paths = sorted(str(p) for p in epath.Path(directory).glob("records-*-of-*.array_record"))
    if not paths:
        raise FileNotFoundError(
            f"No record shards (records-*-of-*.array_record) in {directory!r}: "
            "make them with caip-make-records"
        )
    return paths


def read_shard(path: str) -> list[bytes]:
    """Every record of one shard, in order (for tools and tests; training reads through grain)."""
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.read_all()
    finally:
        reader.close()


class ShardWriter:
    """Writes samples round-robin by episode into `count` shards, so a shard's content depends
    only on the episode order, never on how many workers converted them."""

    def __init__(self, directory: str, count: int):
        os.makedirs(directory, exist_ok=True)
        self._paths = [os.path.join(directory, SHARD_PATTERN.format(index=i, count=count)) for i in range(count)]
        self._writers = [array_record_module.ArrayRecordWriter(p, WRITER_OPTIONS) for p in self._paths]
        self._written = [0] * count

    def write_episode(self, episode_number: int, records: list[bytes]) -> None:
        shard = episode_number % len(self._writers)
        for record in records:
            self._writers[shard].write(record)
        self._written[shard] += len(records)

    def close(self) -> None:
        """Closes the shards and removes empty ones (fewer episodes than shards), which
        ArrayRecord readers cannot open."""
        for writer, path, written in zip(self._writers, self._paths, self._written):
            writer.close()
            if not written:
                os.remove(path)


def read_json(directory: str, name: str) -> dict:
    return json.loads((epath.Path(directory) / name).read_text())


def write_json(directory: str, name: str, content: dict) -> None:
    """Writes atomically, so a reader never sees half a file."""
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def no_intrinsics() -> np.ndarray:
    return np.full((3, 3), np.nan, np.float32)
