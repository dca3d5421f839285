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
import glob
import json
import os

import numpy as np
from array_record.python import array_record_module
from flax import serialization

SHARD_PATTERN = "records-{index:05d}-of-{count:05d}.array_record"


def encode(sample: dict) -> bytes:
    return serialization.msgpack_serialize(sample)


def decode(record: bytes) -> dict:
    return serialization.msgpack_restore(record)


def shard_paths(directory: str) -> list[str]:
    """The record shards of a record set, in order; an error if there are none."""
    paths = sorted(glob.glob(os.path.join(directory, "records-*-of-*.array_record")))
    if not paths:
        raise FileNotFoundError(
            f"No record shards (records-*-of-*.array_record) in {directory!r}: "
            "make them with caip-make-records"
        )
    return paths


class ShardWriter:
    """Writes samples round-robin by episode into `count` shards, so a shard's content depends
    only on the episode order, never on how many workers converted them."""

    def __init__(self, directory: str, count: int):
        os.makedirs(directory, exist_ok=True)
        self._writers = [
            array_record_module.ArrayRecordWriter(
                os.path.join(directory, SHARD_PATTERN.format(index=i, count=count)), "group_size:1"
            )
            for i in range(count)
        ]
        self.records = 0
        self.bytes = 0

    def write_episode(self, episode_number: int, records: list[bytes]) -> None:
        writer = self._writers[episode_number % len(self._writers)]
        for record in records:
            writer.write(record)
        self.records += len(records)
        self.bytes += sum(len(r) for r in records)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def read_json(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def write_json(directory: str, name: str, content: dict) -> None:
    """Writes atomically, so a reader never sees half a file."""
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def no_intrinsics() -> np.ndarray:
    return np.full((3, 3), np.nan, np.float32)
