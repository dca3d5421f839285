"""Record sets: ArrayRecord shards of samples, one sample per anchor frame, plus JSON beside them.

A record set directory holds

    records-00000-of-00004.array_record ...   the samples (msgpack, see `Sample`)
    stats.json                                action mean/std per delta mode (caip_jax.data.stats)
    summary.json                              what the conversion did: counts, skipped episodes
                                              (written last: a record set with it is complete)

A sample (one record) is a msgpack map:

    image        bytes    the anchor frame as JPEG (short side `jpeg_short_side`, default 288)
    text         str      the instruction
    poses        map      the T+1 camera-frame poses, compressed (caip_jax.actions.compress_poses)
    valid        [T+1, 2] bool hand validity at the anchor and the T future steps
    source, episode_id, view (head|wrist): str;  frame_index: int (anchor's frame in the video)
    intrinsics   [3, 3]   float32, pixels of the stored JPEG (NaN when the source has none)
    labels       map str -> str (for probes; e.g. the demo world's target, hand, verb)
"""
import concurrent.futures
import dataclasses
import json
import logging
import os
import re

import msgpack
import numpy as np
from array_record.python import array_record_module
from etils import epath

from caip_jax import storage

# One record per chunk: cheap random access for grain. Uncompressed: zstd (the default) saves
# only ~10% (JPEG bytes do not compress) and costs ~30 us a read, ~4% of a sample's host time.
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_PATTERN = "records-{index:05d}-of-{count:05d}.array_record"
_SHARD_NAME = re.compile(r"records-(\d{5})-of-(\d{5})\.array_record")
MISSING_SHARDS = ("error", "skip")  # what opening a record set does with absent or unreadable shards
_OPEN_THREADS = 64  # shards whose index is read at once (remote files: latency, not bandwidth)


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
        records = reader.read_all() if reader.ok() else []
        reader.close()  # a reader that could not open raises here (it reads nothing, silently)
        return records
    except RuntimeError as error:  # Riegeli's messages name a byte offset, never the file
        raise RecordSetError(
            f"{path} cannot be read ({error or 'a damaged index'}): restore the shard, or rebuild the record set"
        ) from error


class RecordSetError(ValueError):
    """A record set whose files are absent, unreadable or disagree with each other."""


@dataclasses.dataclass(frozen=True)
class RecordSet:
    """The shards of a record set that are read, verified when it was opened (`open_set`), and
    what was left out of it (`missing_shards="skip"`)."""

    directory: str
    shards: tuple[str, ...]  # paths, in file order
    counts: tuple[int, ...]  # records in each, from its index
    missing_shards: tuple[str, ...] = ()  # file names left out: absent or unreadable
    records_lost: int | None = 0  # the records they held (by summary.json); None: nothing says

    def loss(self) -> dict:
        """What training on this set misses, for the log and the checkpoint."""
        return dict(missing_shards=list(self.missing_shards), records_lost=self.records_lost)

    def locate(self, index: int) -> str:
        """Record `index` of the set (file order) -> "SHARD record POSITION"."""
        for path, count in zip(self.shards, self.counts):
            if index < count:
                return f"{os.path.basename(path)} record {index}"
            index -= count
        raise IndexError(f"record {index} beyond the {sum(self.counts)} of {self.directory}")


def count_records(path: str) -> int | str:
    """The records of one shard, from its index at the end of the file (no record is read; grain
    opens every shard this way too), or why it cannot be read (absent, truncated, damaged)."""
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    count = reader.num_records() if reader.ok() else None
    try:
        reader.close()  # a reader that could not open says why here, and only here
    except RuntimeError as error:
        return str(error) or "its index (at the end of the file) cannot be read"
    return count


def open_set(directory: str, missing_shards: str = "error") -> RecordSet:
    """The record set in `directory` (caip-make-records), verified without reading a record:
    every shard is named records-IIIII-of-NNNNN of one N; each present one opens (its index
    reads, as grain needs anyway); and with summary.json, the shards hold the records it counts.
    Absent index numbers are fine when the count says nothing is missing: a conversion of fewer
    episodes than shards writes no empty shards. See `verify` for what happens otherwise."""
    paths = shard_paths(directory)
    names = [_SHARD_NAME.fullmatch(os.path.basename(p)) for p in paths]
    if None in names:
        raise RecordSetError(f"{paths[names.index(None)]} is not named {SHARD_PATTERN}: remove it from {directory}")
    totals = sorted({int(m[2]) for m in names})
    if len(totals) > 1:
        raise RecordSetError(
            f"{directory} holds shards of {len(totals)} conversions (-of-{totals[0]:05d}, -of-{totals[1]:05d}): "
            "rebuild the record set with caip-make-records into an empty directory"
        )
    present = {int(m[1]) for m in names}
    absent = [SHARD_PATTERN.format(index=i, count=totals[0]) for i in range(totals[0]) if i not in present]
    expected = None
    if storage.exists(storage.join(directory, "summary.json")):
        summary = read_json(directory, "summary.json")
        if not isinstance(summary, dict) or not isinstance(summary.get("records"), int):
            raise RecordSetError(f"{directory}/summary.json has no record count ('records'): restore it, or rebuild the record set")
        expected = summary["records"]
    return verify(directory, [(p, None) for p in paths], absent, expected, "summary.json", missing_shards)


def verify(directory: str, shards: list[tuple[str, int | None]], absent: list[str], expected: int | None,
           counted_by: str, missing_shards: str = "error") -> RecordSet:
    """The readable shards of `shards` ((path, its expected record count or None) each), given
    the file names known to be `absent` and the `expected` total (None: unknown) that the file
    `counted_by` gives. Shards that cannot be read or hold other counts, absent ones where
    records are missing, and a total short of `expected` are an error naming each file and the
    fix; or, with `missing_shards="skip"`, left out with a warning and counted in the result.
    More records than `expected` is always an error (the count belongs to another set)."""
    with concurrent.futures.ThreadPoolExecutor(min(_OPEN_THREADS, len(shards))) as pool:
        found = list(pool.map(count_records, [path for path, _ in shards]))
    problems, kept = {}, []
    for (path, want), got in zip(shards, found):
        if isinstance(got, str):
            problems[os.path.basename(path)] = f"cannot be read ({got})"
        elif want is not None and got != want:
            problems[os.path.basename(path)] = f"holds {got} records, {counted_by} says {want}"
        else:
            kept.append((path, got))
    held = sum(count for _, count in kept)
    lost = None if expected is None else expected - held
    if lost is not None and lost < 0:
        raise RecordSetError(
            f"{directory}: the shards hold {held} records but {counted_by} counts {expected}: it belongs to "
            "another conversion; restore it, or rebuild the record set"
        )
    if absent and lost != 0:
        problems.update({name: "is absent" for name in absent})
    paths, counts = tuple(path for path, _ in kept), tuple(count for _, count in kept)
    if not problems and not lost:
        return RecordSet(directory, paths, counts)
    summary = "; ".join(f"{name} {why}" for name, why in problems.items()) or "every shard opens"
    count = (f"{counted_by} counts {expected} records, the readable shards hold {held} ({lost} lost)"
             if lost is not None else f"no {counted_by} says how many records are lost")
    message = f"record set {directory}: {summary}; {count}"
    if not kept:
        raise RecordSetError(f"{message}. Restore the files or rebuild the record set (caip-make-records)")
    if missing_shards != "skip":
        raise RecordSetError(
            f"{message}. Restore the files or rebuild the record set (caip-make-records); or set "
            "data.missing_shards=skip to train on the rest (what is lost is logged and kept in the checkpoint)"
        )
    logging.warning("%s: training on the other %d shards (data.missing_shards=skip)", message, len(kept))
    return RecordSet(directory, paths, counts, missing_shards=tuple(problems), records_lost=lost)


class ShardWriter:
    """Writes samples round-robin by episode into `count` shards, so a shard's content depends
    only on the episode order, never on how many workers converted them. ArrayRecord writes
    local files only: `directory` is local (see storage.staged_directory)."""

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
    path = storage.join(directory, name)
    try:
        return storage.read_json(path)
    except json.JSONDecodeError as error:
        raise RecordSetError(
            f"{path} is not valid JSON ({error}): restore the file, or rebuild the record set "
            "(caip-make-records; caip-records-to-tfds for its TFDS form)"
        ) from error


def write_json(directory: str, name: str, content: dict) -> None:
    """Writes whole or not at all (storage.write_bytes), so a reader never sees half a file."""
    storage.write_json(storage.join(directory, name), content)


def no_intrinsics() -> np.ndarray:
    return np.full((3, 3), np.nan, np.float32)
