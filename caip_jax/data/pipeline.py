"""The grain input pipeline: record sets -> batches of uint8 images, token ids, stored pose
offsets and colour-jitter factors (Preprocess); caip_jax.device_prep finishes them on the device.

The order of samples is a function of the seed and the records only. The global stream is a
seeded shuffle of all records, reshuffled every epoch; global batch k is samples
[k B, (k + 1) B) of it. Process p of P takes rows [p B/P, (p + 1) B/P) of every global batch, by
slicing grain's random-access dataset, so a run on any number of processes, devices or loader
workers sees the same global batches, and an iterator restored from a checkpoint continues
with the identical next batch. Augmentation randomness is drawn per global sample index.
"""
import dataclasses
import functools
import io
import logging
import math
import os
import re
from collections.abc import Sequence

import grain
from absl import flags
from etils import epath
from grain._src.python.dataset.transformations import batch as grain_batch
import numpy as np
from PIL import Image

from caip_jax import storage
from caip_jax.data import batch_ring, range_reads, records, tfds_builder
from caip_jax.data.tokenizer import Tokenizer


class DataConfigError(ValueError):
    """The records do not fit the config (not a bad record: no record would fit)."""


class ShardReadError(OSError):
    """A shard could not be read at all, not one bad record: deleted since the set was opened, or
    a storage error that outlasted the client's retries. Skipping its records as corrupt would
    change the data silently and, unlike a damaged chunk, differently after a restart."""


def _unreadable_shard(error: Exception) -> bool:
    """A read failure of the file itself (absent now, or a storage outage), as array_record's
    readers, local or GCS, word it."""
    text = str(error)
    return (isinstance(error, FileNotFoundError) or "Not Found" in text or "NOT_FOUND" in text
            or "No such file" in text or storage.is_transient(error))


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random resized crop (area fraction and aspect-ratio factor of the frame) and colour
    jitter. There is no horizontal flip: it would swap the hands without mirroring actions."""

    crop_area: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


class Preprocess:
    """One record -> one sample, ready for `caip_jax.device_prep` inside the jitted step:

        image              [S, S, 3] uint8 (a random crop of the frame with an rng; else the
                           whole frame, resized as SigLIP's processor does)
        jitter             [3] float32 colour-jitter factors (brightness, contrast, saturation;
                           ones without an rng), applied on the device
        text               [L] int32 token ids
        translation        [T, 2, 21, 3] int16, translation_scale [1] float32, rotation
                           [T, 2, 21, 3] int16: the stored pose offsets of the first T steps
        valid              [T + 1, 2] bool

    The host decodes, crops and tokenises; action chunks and colours are computed on the
    accelerator (device_prep.py), where they cost almost nothing, instead of halving the
    samples a host CPU delivers. `with_metadata` adds episode_id, frame_index, source and
    labels (str -> str; each source has its own keys, so batch one source's samples only).
    """

    def __init__(
        self,
        tokenizer_path: str,
        image_size: int,
        text_length: int,
        horizon: int,
        augment: Augment = Augment(),
        with_metadata: bool = False,
    ):
        self.tokenizer_path, self.text_length = tokenizer_path, text_length
        self.image_size, self.horizon = image_size, horizon
        self.augment, self.with_metadata = augment, with_metadata
        self._tokenizer = None  # loaded in each worker process, not pickled into it
        self._ids: dict[str, np.ndarray] = {}

    def __call__(self, record: bytes | dict, rng: np.random.Generator | None = None) -> dict:
        """`record`: bytes from a record set, or a sample dict from the TFDS form."""
        sample = records.decode(record) if isinstance(record, bytes) else record
        stored = len(sample["valid"]) - 1
        if stored < self.horizon:
            raise DataConfigError(
                f"records hold {stored} future steps but model.action.horizon={self.horizon}: "
                "convert with a longer --horizon or lower the horizon"
            )
        poses, t = sample["poses"], self.horizon
        out = dict(
            image=self.image(sample["image"], rng),
            jitter=self.jitter(rng),
            text=self.tokenize(sample["text"]),
            translation=poses["translation"][:t],
            translation_scale=np.asarray(poses["translation_scale"], np.float32),
            rotation=poses["rotation"][:t],
            valid=np.asarray(sample["valid"][: t + 1], bool),
        )
        if self.with_metadata:
            out.update({key: sample[key] for key in ("episode_id", "frame_index", "source", "labels")})
        return out

    def tokenize(self, text: str) -> np.ndarray:
        """[L] int32 ids; cached, since every anchor of an episode repeats its instruction."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path, self.text_length)
        if text not in self._ids:
            if len(self._ids) >= 65536:
                self._ids.clear()
            self._ids[text] = self._tokenizer.encode([text])[0]
        return self._ids[text]

    def image(self, jpeg: bytes | np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """JPEG bytes or a decoded [H, W, 3] uint8 frame -> [S, S, 3] uint8: the whole frame
        resized, or with an rng a random crop of it (area fraction and aspect ratio)."""
        image = Image.open(io.BytesIO(jpeg)) if isinstance(jpeg, bytes) else Image.fromarray(jpeg)
        if image.mode != "RGB":  # convert() copies even when the mode is right
            image = image.convert("RGB")
        size, box = (self.image_size, self.image_size), None
        if rng is not None:
            a = self.augment
            u_area, u_ratio, u_x, u_y = rng.random(4).tolist()  # one call: each costs ~1 us
            area = _between(a.crop_area, u_area)
            ratio = math.exp(_between([math.log(r) for r in a.crop_ratio], u_ratio))
            w = min(1.0, math.sqrt(area * ratio)) * image.width
            h = min(1.0, math.sqrt(area / ratio)) * image.height
            x0, y0 = u_x * (image.width - w), u_y * (image.height - h)
            box = (x0, y0, x0 + w, y0 + h)
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=box))

    def jitter(self, rng: np.random.Generator | None) -> np.ndarray:
        """[3] float32 brightness, contrast and saturation factors (ones without an rng)."""
        if rng is None:
            return np.ones(3, np.float32)
        a = self.augment
        amount = np.array([a.brightness, a.contrast, a.saturation])
        return (1 + amount * (2 * rng.random(3) - 1)).astype(np.float32)


def _between(bounds: Sequence[float], u: float) -> float:
    """A uniform draw `u` in [0, 1) -> the same quantile of [bounds[0], bounds[1])."""
    return bounds[0] + u * (bounds[1] - bounds[0])


class SkipCorrupt(grain.MapDataset):
    """Records of `record_set` at the positions `parent` gives (record indices: a shuffled,
    repeated stream), passed through `transform`. A record that fails, to read (a chunk whose
    hash does not match) or to decode (a corrupt JPEG), is logged with its set, shard and
    position and replaced by the next record of the stream, so that one bad record can neither
    stop training nor shift the batches of other processes; the same ones fail after a restart.
    Each sample gets `skipped` (int32): 1 where its stream position's own record failed and
    the next one stands in, so that summing it counts what training missed. In an ArrayRecord
    file every record of a damaged chunk fails; ours (and TFDS's) hold one record a chunk."""

    def __init__(self, parent: grain.MapDataset, record_set: records.RecordSet, transform,
                 seed: tuple[int, ...] | None, attempts: int = 16):
        super().__init__(parent)
        self._set, self._records = record_set, record_dataset(record_set)
        self._transform, self._seed, self._attempts = transform, seed, attempts

    def __len__(self) -> int:
        return len(self._parent)

    def _getitems(self, indices: Sequence[int]) -> list[dict]:
        """`[self[i] for i in indices]`, with the records read at once: concurrently (grain's
        batch calls this, see BatchedReads). A sample whose record fails to read or decode, and
        every sample of a batched read that fails and whose record then fails alone, takes the
        per-record path (`__getitem__`): the same log, stand-in, rng and `skipped` flag."""
        indices = list(indices)
        positions = [self._parent[i % len(self._parent)] for i in indices]
        samples = []
        for index, record in zip(indices, self._read(positions)):
            if record is not None:
                rng = None if self._seed is None else np.random.default_rng((*self._seed, index))
                try:
                    samples.append(dict(self._transform(record, rng), skipped=np.int32(0)))
                    continue
                except DataConfigError:
                    raise
                except Exception:
                    pass  # __getitem__ reads it again, fails again, and logs it with its stand-in
            samples.append(self[index])
        return samples

    def _read(self, positions: list[int]) -> list:
        """The records at `positions` (None for one that fails to read), read concurrently. A
        batched read fails whole when any of its records does (a chunk that fails its hash):
        then each half is read again, so one bad record costs about 2 log2(n) batched reads, not
        n reads one at a time."""
        try:
            return list(self._records._getitems(positions))
        except DataConfigError:
            raise
        except Exception:
            if len(positions) == 1:
                return [None]
            half = len(positions) // 2
            return self._read(positions[:half]) + self._read(positions[half:])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        for offset in range(self._attempts):
            position = self._parent[(index + offset) % len(self._parent)]
            rng = None if self._seed is None else np.random.default_rng((*self._seed, index))
            record = None
            try:
                record = self._records[position]
                return dict(self._transform(record, rng), skipped=np.int32(offset > 0))
            except DataConfigError:
                raise
            except Exception as error:
                if record is None and _unreadable_shard(error):
                    raise ShardReadError(
                        f"{self._set.directory}: {self._set.locate(position)} cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]}): the shard was deleted or the storage failed since the "
                        "set was opened; restore it and run again (training resumes from its last checkpoint)"
                    ) from error
                logging.error("skipping a corrupt record: %s %s (%s) at stream index %d: %s: %s",
                              self._set.directory, self._set.locate(position), _identity(record),
                              index + offset, type(error).__name__, error)
                last_error = error  # `error` itself is unbound after the except clause
        raise RuntimeError(
            f"{self._attempts} records in a row from stream index {index} failed (see the log): the record "
            f"set {self._set.directory} is broken, or a bug; not a stray corrupt record"
        ) from last_error


def _identity(record: bytes | dict | None) -> str:
    if record is None:
        return "unreadable"
    try:
        sample = records.decode(record) if isinstance(record, bytes) else record
        return f"{sample['source']}/{sample['episode_id']} frame {sample['frame_index']}"
    except Exception:
        return f"undecodable record of {len(record)} bytes"


def _is_tfds(directory: str) -> bool:
    return (epath.Path(directory) / "dataset_info.json").exists()


def open_record_set(directory: str, missing_shards: str = "error") -> records.RecordSet:
    """A record set, or its TFDS form (the dataset's version directory, e.g.
    DATA_DIR/caip_records/1.0.0), verified without reading a record (records.verify); absent or
    unreadable shards are an error, or with `missing_shards="skip"` left out and counted."""
    if missing_shards not in records.MISSING_SHARDS:
        raise DataConfigError(f"data.missing_shards={missing_shards!r} is not one of {records.MISSING_SHARDS}")
    if _is_tfds(directory):
        return tfds_builder.open_set(directory, missing_shards)
    return records.open_set(directory, missing_shards)


class ConcurrentReads(grain.sources.ArrayRecordDataSource):
    """grain's ArrayRecord source, whose batched read grain's MapDataset.source calls: it has
    `__getitems__` (reads in parallel: a thread per shard, and array_record's C++ reader reads
    one shard's records in parallel), but grain 0.2.18 only calls a source's `_getitems`.
    Local shards; gs:// ones are read by `range_reads.RangeReads`, also a batch at once: there
    every record is a request, and a batch read one record at a time waits a latency a record."""

    def _getitems(self, record_keys: Sequence[int]) -> Sequence[bytes]:
        return self.__getitems__(record_keys)


class BatchedReads(grain_batch.BatchMapDataset):
    """`parent.batch(size)`, reading each batch's elements with one `_getitems` call, so that
    SkipCorrupt reads a batch's records at once. grain's own batch does this only under an
    experiment flag that 0.2.18 hard-codes off; the batches are the same either way."""

    @functools.cached_property
    def _get_parent_items_fn(self):
        return lambda items: self._parent._getitems(list(items))


def record_dataset(record_set: str | records.RecordSet) -> grain.MapDataset:
    """The records of a record set (bytes), or of its TFDS form (sample dicts), in file order.
    A directory is opened with `open_record_set` (absent or unreadable shards an error)."""
    if isinstance(record_set, str):
        record_set = open_record_set(record_set)
    if all(path.startswith("gs://") for path in record_set.shards):
        source = range_reads.RangeReads(record_set.shards, record_set.counts)
    else:  # "path[0:n]": grain takes the counts as given instead of opening every shard again.
        source = ConcurrentReads([f"{path}[0:{count}]" for path, count in zip(record_set.shards, record_set.counts)])
    dataset = grain.MapDataset.source(source)
    if _is_tfds(record_set.directory):
        return dataset.map(tfds_builder.decoder(record_set.directory))
    return dataset


@dataclasses.dataclass(frozen=True)
class Source:
    """One record set of the training mixture."""

    name: str
    path: str
    weight: float = 1.0


_MIXTURE_ENTRY = re.compile(r"(\w+):([0-9.eE+-]+):(.+)")


def parse_sources(spec: str) -> list[Source]:
    """`data.train`: one record-set path, or a weighted mixture of named record sets,
    "lab:0.3:/data/lab,wild:0.65:gs://bucket/wild,robot:0.05:/data/robot" (name:weight:path)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    matches = [_MIXTURE_ENTRY.fullmatch(e) for e in entries]
    if len(entries) == 1 and matches[0] is None:
        return [Source("train", entries[0])]
    if not entries or None in matches:
        raise DataConfigError(
            f"data.train={spec!r}: give one record-set path, or name:weight:path entries separated by commas"
        )
    sources = [Source(m.group(1), m.group(3), float(m.group(2))) for m in matches]
    names = [s.name for s in sources]
    if len(set(names)) != len(names) or any(s.weight <= 0 for s in sources):
        raise DataConfigError(f"data.train={spec!r}: names must differ and weights be positive")
    return sources


def mixture_stats(stats: Sequence[dict], weights: Sequence[float]) -> dict:
    """Per-source stats.json contents -> the mean and std of the mixture that training draws
    from (each source in proportion to its weight, whatever its size), per delta mode. A
    dimension a source never saw takes its value from the others."""
    out = {}
    for delta in stats[0]:
        count = np.stack([np.asarray(s[delta]["count"], np.float64) for s in stats])
        mean = np.stack([np.asarray(s[delta]["mean"], np.float64) for s in stats])
        var = np.stack([np.asarray(s[delta]["std"], np.float64) ** 2 for s in stats])
        w = np.asarray(weights, np.float64).reshape(-1, *[1] * (count.ndim - 1)) * (count > 0)
        w = w / np.maximum(w.sum(axis=0), 1e-30)
        mixed_mean = (w * mean).sum(axis=0)
        mixed_var = (w * (var + mean**2)).sum(axis=0) - mixed_mean**2
        out[delta] = dict(mean=mixed_mean.tolist(), std=np.sqrt(np.maximum(mixed_var, 0.0)).tolist())
    return out


def train_batches(
    sources: Sequence[tuple[str, "Preprocess", float]],
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This process's rows of every global training batch: an infinite MapDataset whose element
    k is a dict of [global_batch / process_count, ...] arrays, with `source_index` [b] int32,
    the position of each sample's source in `sources`.

    `sources`: (record set, its preprocessing, weight) each; a record set is a directory
    (opened with missing shards an error) or an opened `records.RecordSet`. Every source is
    shuffled and repeated on its own, then grain mixes them in proportion to the weights,
    whatever their sizes (a small set repeats; a large one is never exhausted first). Samples
    carry `skipped` (see SkipCorrupt).
    """
    if global_batch % process_count:
        raise DataConfigError(f"batch_size={global_batch} is not divisible by the {process_count} processes")
    streams = []
    for i, (record_set, preprocess, _) in enumerate(sources):
        record_set = open_record_set(record_set) if isinstance(record_set, str) else record_set
        indices = grain.MapDataset.range(sum(record_set.counts)).shuffle(seed=seed + i).repeat()
        streams.append(SkipCorrupt(indices, record_set, preprocess, seed=(seed, i)).map(functools.partial(_tag_source, i)))
    samples = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for *_, w in sources])
    local = global_batch // process_count
    return BatchedReads(samples, local, drop_remainder=True)[process_index::process_count]


def _tag_source(index: int, sample: dict) -> dict:
    return dict(sample, source_index=np.int32(index))


def eval_samples(directory: str, preprocess: Preprocess) -> grain.MapDataset:
    """Every record once, in record order, without augmentation."""
    record_set = open_record_set(directory)
    return SkipCorrupt(grain.MapDataset.range(sum(record_set.counts)), record_set, preprocess, seed=None)


def iterate(dataset: grain.MapDataset, workers: int = 0, threads: int = 4):
    """A checkpointable iterator over `dataset`, decoding in `workers` processes (0: in this
    process), each with `threads` threads. The order depends on neither. Workers hand batches
    over through reused shared memory (batch_ring.py)."""
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's workers read absl flags; outside absl.app.run (tests, notebooks) nothing
            # has parsed them, and the defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        rings = batch_ring.make_directory()
        watchdog = functools.partial(batch_ring.exit_with_trainer, os.getpid(), rings)
        iter_dataset = (iter_dataset.map(batch_ring.RingWriter(rings))
                        .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=watchdog)
                        .map(batch_ring.RingReader(rings)))
    return iter(iter_dataset)
