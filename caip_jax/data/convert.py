"""Episodes -> record sets. `convert_episode` is the one conversion of one episode; the
single-machine `convert` below and the Apache Beam pipeline both call it, never a copy of it.
"""
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import io
import logging
import multiprocessing
import threading
import time

import numpy as np
import tqdm
from PIL import Image

from caip_jax import actions, storage
from caip_jax.data import records
from caip_jax.data.schema import Episode, EpisodeError
from caip_jax.data.stats import RunningStats

SOURCES = ("demo_world", "egodex", "lerobot", "npz")


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    horizon: int = 64  # T: future steps per action chunk, at `target_fps`
    stride: int = 10  # steps between anchors (10 at 30 Hz: 3 samples per second of video)
    jpeg_short_side: int = 288
    jpeg_quality: int = 90
    target_fps: float = 30.0


@dataclasses.dataclass
class EpisodeResult:
    """What one episode became: its samples, in anchor order, and their action statistics."""

    episode_id: str
    records: list[bytes]
    stats: dict[str, RunningStats]  # per delta mode (actions.DELTAS)
    invalidated_hand_frames: int
    warnings: list[str] = dataclasses.field(default_factory=list)  # what the source made of a defective file


def source_module(name: str):
    if name not in SOURCES:
        raise ValueError(f"Unknown source {name!r}: use one of {SOURCES}")
    return importlib.import_module(f"caip_jax.data.sources.{name}")


def list_keys(source: str, input_path: str, source_options: dict) -> list[str]:
    """The episode keys of `source` under `input_path`; an error if there are none."""
    keys = source_module(source).list_episodes(input_path, **source_options)
    if not keys:
        raise FileNotFoundError(f"Source {source!r} found no episodes under {input_path!r}")
    return keys


def encode_jpeg(frame: np.ndarray, short_side: int, quality: int) -> tuple[bytes, float]:
    """[H, W, 3] uint8 -> JPEG bytes with the short side resized to `short_side` (never
    enlarged), and the scale applied."""
    image = Image.fromarray(frame)
    scale = min(1.0, short_side / min(image.size))
    if scale < 1.0:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), scale


def convert_episode(episode: Episode, options: ConvertOptions) -> EpisodeResult:
    """One episode -> one sample per anchor (see records.py for the sample's fields).

    Raises EpisodeError for an episode that cannot give a single sample (inconsistent shapes,
    too short, undecodable video); invalid hand poses (NaN, not rigid) only mask those hands.
    """
    episode.check()
    valid, invalidated = actions.sanitize(episode.hand_valid, episode.hands)
    steps = actions.resample(episode.hands, valid, episode.camera, episode.fps, options.target_fps)
    anchors = actions.anchor_indices(len(steps.hands), options.horizon, options.stride)
    if not len(anchors):
        raise EpisodeError(
            f"{episode.episode_id}: {len(steps.hands)} steps at {options.target_fps} Hz is too short "
            f"for one anchor with {options.horizon} future steps"
        )
    intrinsics = records.no_intrinsics() if episode.intrinsics is None else episode.intrinsics
    frame_of_anchor = steps.source_index[anchors]
    frames = dict(zip(np.unique(frame_of_anchor).tolist(), _jpegs(episode, np.unique(frame_of_anchor), options)))

    out, chunks = [], {delta: [] for delta in actions.DELTAS}
    for anchor, frame_index in zip(anchors, frame_of_anchor.tolist()):
        window = slice(anchor, anchor + options.horizon + 1)
        poses = actions.to_camera_frame(
            actions.fill_invalid(steps.hands[window], steps.hand_valid[window]), steps.camera[anchor]
        )
        jpeg, scale = frames[frame_index]
        sample = dict(
            image=jpeg,
            text=episode.text,
            poses=actions.compress_poses(poses),
            valid=steps.hand_valid[window],
            source=episode.source,
            episode_id=episode.episode_id,
            view=episode.view,
            frame_index=frame_index,
            intrinsics=(intrinsics * np.array([[scale], [scale], [1.0]])).astype(np.float32),
            labels=dict(episode.labels),
        )
        out.append(records.encode(sample))
        for delta in actions.DELTAS:
            chunks[delta].append(actions.action_chunk(poses, steps.hand_valid[window], delta))
    stats = {
        delta: RunningStats.of_batch(np.stack([a for a, _ in c]), np.stack([m for _, m in c]))
        for delta, c in chunks.items()
    }
    return EpisodeResult(episode.episode_id, out, stats, invalidated)


def _jpegs(episode: Episode, indices: np.ndarray, options: ConvertOptions):
    """JPEG and scale of each frame at `indices`, decoding one frame at a time."""
    for frame in episode.frames.iterate(indices):
        yield encode_jpeg(frame, options.jpeg_short_side, options.jpeg_quality)


def read_and_convert(source: str, input_path: str, source_options: dict, options: ConvertOptions, key: str):
    """`convert_episode` of one key, with the warnings logged meanwhile (a source's account of
    a defect it worked around); failures come back as (key, reason) instead of raising, so one
    bad episode never stops a conversion and is always reported by name."""
    try:
        with _warnings_logged() as warnings:
            episode = source_module(source).read_episode(input_path, key, **source_options)
            result = convert_episode(episode, options)
        result.warnings = warnings
        return result
    except EpisodeError as error:
        return key, str(error)
    except Exception as error:  # a corrupt file can raise anything from h5py, PyAV or PIL
        logging.exception("episode %s failed", key)
        return key, f"{type(error).__name__}: {error}"


class _ThreadWarnings(logging.Handler):
    """Keeps the messages of the warnings this thread logs (Beam may run bundles in threads)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_logged():
    """The messages of the warnings that caip_jax logs in this thread inside the block."""
    handler, logger = _ThreadWarnings(), logging.getLogger("caip_jax")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


class Summary:
    """Counts of a conversion, merged from episode results, written as summary.json."""

    def __init__(self):
        self.stats = {delta: RunningStats() for delta in actions.DELTAS}
        self.converted = 0
        self.records = 0
        self.bytes = 0
        self.failed: dict[str, str] = {}
        self.invalidated_hand_frames: dict[str, int] = {}
        self.warnings: dict[str, list[str]] = {}

    def add(self, result) -> None:
        if not isinstance(result, EpisodeResult):
            key, reason = result
            self.failed[key] = reason
            return
        self.converted += 1
        self.records += len(result.records)
        self.bytes += sum(len(r) for r in result.records)
        for delta, stats in result.stats.items():
            self.stats[delta] = self.stats[delta].merge(stats)
        if result.invalidated_hand_frames:
            self.invalidated_hand_frames[result.episode_id] = result.invalidated_hand_frames
        if result.warnings:
            self.warnings[result.episode_id] = result.warnings

    def merge(self, other: "Summary") -> "Summary":
        """The Summary of both (which hold disjoint episodes), as parallel workers need."""
        out = Summary()
        out.converted, out.records, out.bytes = (
            self.converted + other.converted,
            self.records + other.records,
            self.bytes + other.bytes,
        )
        out.failed = {**self.failed, **other.failed}
        out.invalidated_hand_frames = {**self.invalidated_hand_frames, **other.invalidated_hand_frames}
        out.warnings = {**self.warnings, **other.warnings}
        out.stats = {delta: stats.merge(other.stats[delta]) for delta, stats in self.stats.items()}
        return out

    def to_json(self, **extra) -> dict:
        return dict(
            extra,
            episodes_converted=self.converted,
            episodes_failed=len(self.failed),
            failed=self.failed,
            records=self.records,
            bytes_per_record=self.bytes / max(1, self.records),
            invalidated_hand_frames=self.invalidated_hand_frames,
            episodes_with_warnings=len(self.warnings),
            warnings=self.warnings,
        )


FIRST_ERRORS = 5  # failures a report quotes; summary.json names them all


def failure_report(summary: dict, output_dir: str, max_failure_fraction: float) -> tuple[str, bool]:
    """What to tell the user about the failed episodes of a conversion's `summary` ('' if none)
    and whether the conversion failed: no episode converted, or more than
    `max_failure_fraction` of them did not (the record set in `output_dir` still holds those
    that did). A handful of bad files in 10,000 is the dataset; a large fraction is a wrong
    option or a broken copy, which a pipeline must not take for a record set."""
    listed, failed = summary["episodes_listed"], summary["failed"]
    if not failed:
        return "", False
    first = list(failed.items())[:FIRST_ERRORS]
    errors = "".join(f"\n  {key}: {reason.removeprefix(f'{key}: ')}" for key, reason in first)
    where = f"every failure is in {output_dir}/summary.json; the first {len(first)}:{errors}"
    if len(failed) == listed:
        return f"ERROR: all {listed} episodes failed, none converted; {where}", True
    counts = f"{len(failed)} of {listed} episodes ({len(failed) / listed:.1%}) failed"
    if len(failed) / listed > max_failure_fraction:
        return (f"ERROR: {counts}, more than max_failure_fraction={max_failure_fraction:g}; {output_dir} holds the "
                f"{listed - len(failed)} that converted; {where}"), True
    return f"WARNING: {counts} (max_failure_fraction={max_failure_fraction:g} allowed); {where}", False


def convert(
    source: str,
    input_path: str,
    output_dir: str,
    options: ConvertOptions = ConvertOptions(),
    source_options: dict | None = None,
    workers: int = 1,
    shards: int = 8,
) -> dict:
    """Converts every episode of `source` under `input_path` into a record set in `output_dir`
    (records, stats.json, summary.json), in parallel over episodes. Returns the summary.

    The output depends on the episodes only: records go to shards round-robin by episode in
    key order, whatever the number of workers.
    """
    source_options = source_options or {}
    keys = list_keys(source, input_path, source_options)
    work = functools.partial(read_and_convert, source, input_path, source_options, options)
    # ArrayRecord writes local files only: a remote record set is written here, then uploaded
    # whole, summary.json (which marks a set complete) last.
    with storage.staged_directory(output_dir, last=("summary.json",)) as local_dir:
        summary, writer = Summary(), records.ShardWriter(local_dir, shards)
        start = time.time()
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(tqdm.tqdm(total=len(keys), desc=f"{source} -> {output_dir}", unit="episode"))
            results = map(work, keys)
            if workers > 1:
                # spawn, not fork: the parent may hold threads (PyAV, h5py) that fork would break.
                pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"))
                results = stack.enter_context(pool).map(work, keys)
            for number, result in enumerate(results):
                summary.add(result)
                if isinstance(result, EpisodeResult):
                    writer.write_episode(number, result.records)
                bar.update()
                bar.set_postfix(records=summary.records, failed=len(summary.failed))
        writer.close()
        elapsed = time.time() - start
        records.write_json(local_dir, "stats.json", {d: s.to_json() for d, s in summary.stats.items()})
        content = summary.to_json(
            source=source,
            input=input_path,
            options=dataclasses.asdict(options),
            source_options=source_options,
            episodes_listed=len(keys),
            seconds=elapsed,
            episodes_per_second=len(keys) / elapsed,
        )
        records.write_json(local_dir, "summary.json", content)
    return content
