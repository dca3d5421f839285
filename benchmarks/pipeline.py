"""Input pipeline throughput against raw JPEG decoding, measured in one run on the same images.

  python benchmarks/pipeline.py [--records DIR] [--seconds 10]

Figures (samples/s): raw JPEG decode + resize to 256x256 in one process; the full host half
of the training pipeline (decode, random resized crop, tokenisation, jitter factors, pose
offsets, batching; colour jitter and action chunks run on the device) in this process, and with 1 and 2 worker processes. Goal: the
pipeline at >= 80% of raw decode per worker, and near-linear scaling from 1 to 2 workers.
Writes benchmarks/results/pipeline.json.
"""
import io
import os
import tempfile
import time

from absl import app, flags
from PIL import Image

import results_io
from caip_jax.data import convert, pipeline, records, tokenizer
from caip_jax.data.sources import demo_world

flags.DEFINE_string("records", None, "A record set to read (default: make demo-world records).")
flags.DEFINE_float("seconds", 10.0, "Measuring time per figure.")
flags.DEFINE_integer("batch", 32, "Batch size of the pipeline.")
FLAGS = flags.FLAGS
SIZE = 256


def rate(next_item, items_per_call: int, seconds: float) -> float:
    """Items per second of `next_item()` over about `seconds`, after one warm-up call."""
    next_item()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next_item()
        count += items_per_call
    return count / (time.perf_counter() - start)


def demo_records(directory: str) -> None:
    """4096 records: grain's index shuffle costs ~0.3 ms a lookup on a set of 64 records but
    under 10 us from a few thousand on, so a toy-sized set would misrepresent real ones."""
    options = convert.ConvertOptions(horizon=64, stride=1)
    source_options = dict(num_episodes=16, image_size=320, num_frames=320)
    convert.convert("demo_world", "", directory, options, source_options, workers=2)


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

    position = iter(range(10**12))

    def raw_decode():
        image = Image.open(io.BytesIO(jpegs[next(position) % len(jpegs)])).convert("RGB")
        image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)

    preprocess = pipeline.Preprocess(spm, SIZE, 64, 64)
    batches = pipeline.train_batches([(directory, preprocess, 1.0)], FLAGS.batch, seed=0)
    figures = dict(raw_decode=rate(raw_decode, 1, FLAGS.seconds))
    for name, workers in (("pipeline_in_process", 0), ("pipeline_1_worker", 1), ("pipeline_2_workers", 2)):
        iterator = pipeline.iterate(batches, workers=workers, threads=1)
        figures[name] = rate(lambda: next(iterator), FLAGS.batch, FLAGS.seconds)
        iterator.close()
    figures["pipeline_1_worker_vs_raw"] = figures["pipeline_1_worker"] / figures["raw_decode"]
    figures["scaling_2_vs_1_workers"] = figures["pipeline_2_workers"] / figures["pipeline_1_worker"]
    result = dict(
        figures=figures,
        image_size=SIZE,
        stored_jpeg_pixels=list(Image.open(io.BytesIO(jpegs[0])).size),
        records=len(jpegs),
        machine=results_io.machine(),
    )
    results_io.write("pipeline", result)


if __name__ == "__main__":
    app.run(main)
