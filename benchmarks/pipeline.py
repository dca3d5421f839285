"""Input pipeline throughput against raw JPEG decoding, measured in one run on the same images.

  python benchmarks/pipeline.py [--records DIR] [--seconds 3] [--rounds 4]

Figures (samples/s): raw JPEG decode + resize to 256x256 in one process; the full host half
of the training pipeline (record read, decode, random resized crop, tokenisation, jitter
factors, pose offsets, batching; colour jitter and action chunks run on the device) in this
process with one and with two loader threads, and with 1 and 2 worker processes of one thread,
handing batches over through our shared-memory ring (caip_jax/data/batch_ring.py) and, for
comparison, through grain's own fresh shared memory per batch. Goal: the pipeline at >= 80% of
raw decode per worker, and near-linear scaling from 1 to 2 workers.

The figures are measured in `rounds` interleaved windows (raw, in process, ..., 2 workers,
raw, ...), so that other load on the machine hits all of them alike; ratios are taken within a
round and the median over rounds is reported. Each window also records the CPU microseconds
per sample of this process and of the workers (from /proc, Linux), and the cores all used
together: what a sample costs whatever else runs, and how many cores a setting can use.
Before them, the CPU cost of each stage of one sample, in this process.
Writes benchmarks/results/pipeline.json.
"""
import io
import os
import statistics
import tempfile
import time
from multiprocessing import shared_memory

import grain
import numpy as np
from absl import app, flags
from PIL import Image

import results_io
from caip_jax.data import batch_ring, convert, pipeline, records, tokenizer
from caip_jax.data.sources import demo_world

flags.DEFINE_string("records", None, "A record set to read (default: make demo-world records).")
flags.DEFINE_float("seconds", 3.0, "Measuring time per figure and round.")
flags.DEFINE_integer("rounds", 4, "Interleaved rounds of the figures.")
flags.DEFINE_integer("batch", 32, "Batch size of the pipeline.")
FLAGS = flags.FLAGS
SIZE = 256
PIPELINES = {  # name: (worker processes, threads per process, through our ring)
    "pipeline_in_process": (0, 1, True),
    "pipeline_in_process_2_threads": (0, 2, True),
    "pipeline_1_worker": (1, 1, True),
    "pipeline_2_workers": (2, 1, True),
    "grain_shared_memory_1_worker": (1, 1, False),
    "grain_shared_memory_2_workers": (2, 1, False),
}


def descendants_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live descendants (the loader workers)."""
    parent_and_cpu = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in () may hold spaces
        except OSError:
            continue  # exited meanwhile
        parent_and_cpu[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    family, grown = {os.getpid()}, True
    while grown:
        children = {pid for pid, (parent, _) in parent_and_cpu.items() if parent in family}
        grown = not children <= family
        family |= children
    family.discard(os.getpid())
    return sum(parent_and_cpu[pid][1] for pid in family) / os.sysconf("SC_CLK_TCK")


def window(next_item, items_per_call: int, seconds: float, warmup: float = 1.0) -> dict:
    """Items per second of `next_item()` over about `seconds`, after `warmup` seconds (which
    also drain what workers buffered while idle), with CPU microseconds per item of this
    process and of its descendants, and the cores both used together."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup:
        next_item()
    count, cpu, workers, start = 0, time.process_time(), descendants_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        next_item()
        count += items_per_call
    wall = time.perf_counter() - start
    cpu, workers = time.process_time() - cpu, descendants_cpu_seconds() - workers
    return dict(rate=count / wall, main_cpu_us=1e6 * cpu / count, worker_cpu_us=1e6 * workers / count,
                cores=(cpu + workers) / wall)


def cpu_us(fn, count: int, passes: int = 3) -> float:
    """CPU microseconds per call of fn(i), i < count: the least disturbed of `passes` passes,
    after one warm-up pass."""
    times = []
    for _ in range(passes + 1):
        start = time.process_time()
        for i in range(count):
            fn(i)
        times.append(time.process_time() - start)
    return 1e6 * min(times[1:]) / count


def demo_records(directory: str) -> None:
    """4096 records: grain's index shuffle costs ~0.3 ms a lookup on a set of 64 records but
    under 10 us from a few thousand on, so a toy-sized set would misrepresent real ones."""
    options = convert.ConvertOptions(horizon=64, stride=1)
    source_options = dict(num_episodes=16, image_size=320, num_frames=320)
    convert.convert("demo_world", "", directory, options, source_options, workers=2)


def decode_and_resize(jpeg: bytes) -> Image.Image:
    """The baseline: the plainest decode + resize (no copy for a mode change it does not need)."""
    image = Image.open(io.BytesIO(jpeg))
    image = image if image.mode == "RGB" else image.convert("RGB")
    return image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def loader(batches, workers: int, threads: int, ring: bool):
    """pipeline.iterate, or (ring=False) the same with grain's own hand-over: each batch copied
    into new shared memory by the worker and mapped by the main process."""
    if ring:
        return pipeline.iterate(batches, workers, threads)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)
    return iter(batches.to_iter_dataset(read).mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def stage_costs(directory: str, preprocess: pipeline.Preprocess, jpegs: list[bytes], batch: int) -> dict:
    """CPU microseconds per sample of each stage, in this process, on 1024 samples; and of
    handing a batch from a loader worker to the main process: through the ring (both sides),
    or into fresh shared memory as grain does (the worker's side only)."""
    count, seed = 1024, (0, 0)
    shuffled = pipeline.record_dataset(directory).shuffle(seed=0).repeat()
    stream = [shuffled[i] for i in range(count)]
    batches = pipeline.train_batches([(directory, preprocess, 1.0)], batch, seed=0)
    batch_bytes = sum(v.nbytes for v in batches[0].values())

    def to_fresh_shared_memory(_):
        """What a loader worker does with each batch (grain's copy_to_shm): new pages each time."""
        block = shared_memory.SharedMemory(create=True, size=batch_bytes)
        np.frombuffer(block.buf, np.uint8)[:] = 1
        block.close()
        block.unlink()

    rings = batch_ring.make_directory()
    writer, reader, sample_batch = batch_ring.RingWriter(rings), batch_ring.RingReader(rings), batches[0]

    return dict(
        raw_decode_resize=cpu_us(lambda i: decode_and_resize(jpegs[i % len(jpegs)]), count),
        record_read=cpu_us(lambda i: shuffled[i], count),
        msgpack_decode=cpu_us(lambda i: records.decode(stream[i]), count),
        rng=cpu_us(lambda i: np.random.default_rng((*seed, i)), count),
        preprocess=cpu_us(lambda i: preprocess(stream[i], np.random.default_rng((*seed, i))), count),
        full_batch=cpu_us(lambda k: batches[k], count // batch) / batch,
        worker_to_shared_memory=cpu_us(to_fresh_shared_memory, count // batch) / batch,
        ring_hand_over=cpu_us(lambda _: reader(writer(sample_batch)), count // batch) / batch,
    )


def main(argv):
    del argv
    work = tempfile.mkdtemp()
    directory = FLAGS.records or os.path.join(work, "records")
    if FLAGS.records is None:
        demo_records(directory)
    jpegs = [records.decode(r)["image"] for path in records.shard_paths(directory) for r in records.read_shard(path)]
    texts = [f"{v} the {c} {s} with the {h} hand" for v in demo_world.VERBS for c in demo_world.COLOURS
             for s in demo_world.SHAPES for h in ("left", "right")]
    spm = tokenizer.train_sentencepiece(texts * 4, os.path.join(work, "spm"), 512)
    preprocess = pipeline.Preprocess(spm, SIZE, 64, 64)
    stages = stage_costs(directory, preprocess, jpegs, FLAGS.batch)

    position = iter(range(10**12))
    batches = pipeline.train_batches([(directory, preprocess, 1.0)], FLAGS.batch, seed=0)
    iterators = {name: loader(batches, *setting) for name, setting in PIPELINES.items()}
    rounds = []
    for _ in range(FLAGS.rounds):
        figures = dict(raw_decode=window(lambda: decode_and_resize(jpegs[next(position) % len(jpegs)]), 1, FLAGS.seconds))
        for name, iterator in iterators.items():
            figures[name] = window(lambda: next(iterator), FLAGS.batch, FLAGS.seconds)
        rounds.append(figures)
        print({name: round(f["rate"]) for name, f in figures.items()})
    for iterator in iterators.values():
        iterator.close()

    def median(fn):
        return statistics.median(fn(r) for r in rounds)

    summary = {name: median(lambda r: r[name]["rate"]) for name in rounds[0]}
    summary.update(
        pipeline_in_process_vs_raw=median(lambda r: r["pipeline_in_process"]["rate"] / r["raw_decode"]["rate"]),
        pipeline_1_worker_vs_raw=median(lambda r: r["pipeline_1_worker"]["rate"] / r["raw_decode"]["rate"]),
        scaling_2_vs_1_workers=median(lambda r: r["pipeline_2_workers"]["rate"] / r["pipeline_1_worker"]["rate"]),
        grain_shared_memory_1_worker_vs_raw=median(
            lambda r: r["grain_shared_memory_1_worker"]["rate"] / r["raw_decode"]["rate"]),
        grain_shared_memory_scaling_2_vs_1_workers=median(
            lambda r: r["grain_shared_memory_2_workers"]["rate"] / r["grain_shared_memory_1_worker"]["rate"]),
        scaling_2_vs_1_threads=median(lambda r: r["pipeline_in_process_2_threads"]["rate"] / r["pipeline_in_process"]["rate"]),
    )
    # CPU per sample, all processes together, and the cores each setting kept busy.
    cpu = {name: dict(cpu_us=median(lambda r: r[name]["main_cpu_us"] + r[name]["worker_cpu_us"]),
                      worker_cpu_us=median(lambda r: r[name]["worker_cpu_us"]),
                      cores=median(lambda r: r[name]["cores"])) for name in rounds[0]}
    result = dict(
        figures=summary,
        cpu_per_sample=cpu,
        stage_cpu_us_per_sample=stages,
        rounds=rounds,
        image_size=SIZE,
        batch=FLAGS.batch,
        stored_jpeg_pixels=list(Image.open(io.BytesIO(jpegs[0])).size),
        records=len(jpegs),
        machine=results_io.machine(),
    )
    results_io.write("pipeline", result)


if __name__ == "__main__":
    app.run(main)
