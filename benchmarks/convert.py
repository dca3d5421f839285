"""Conversion throughput on one machine: the single-machine tool against Apache Beam, in one run
on the same demo-world episodes.

  python benchmarks/convert.py [--episodes 24] [--image_size 256] [--frames 96]

Figures (episodes/s and source frames/s, wall time of the whole call, start-up included):
`convert.convert` with 1 and 2 worker processes, and `convert_with_beam` on the DirectRunner
with 1 and 2 worker processes (multi_processing). Every run must write the same shards; the
benchmark checks it. Writes benchmarks/results/convert.json.
"""
import os
import tempfile
import time

from absl import app, flags

import results_io
from caip_jax.data import convert, records
from caip_jax.data.beam import convert_with_beam

flags.DEFINE_integer("episodes", 24, "Demo-world episodes per run.")
flags.DEFINE_integer("image_size", 256, "Demo-world frame size (pixels, square).")
flags.DEFINE_integer("frames", 96, "Frames per demo-world episode.")
flags.DEFINE_integer("shards", 8, "Record shards.")
FLAGS = flags.FLAGS


def direct_runner(workers: int) -> list[str]:
    return ["--runner=DirectRunner", f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def runs(source_options: dict) -> dict:
    """Name -> function(output_dir) -> summary, for each conversion measured."""
    options = convert.ConvertOptions()
    single = lambda workers: lambda out: convert.convert(
        "demo_world", "", out, options, source_options, workers=workers, shards=FLAGS.shards
    )
    beam = lambda workers: lambda out: convert_with_beam(
        "demo_world", "", out, options, source_options, FLAGS.shards, direct_runner(workers)
    )
    return {
        "single_machine_1_worker": single(1),
        "single_machine_2_workers": single(2),
        "beam_direct_1_worker": beam(1),
        "beam_direct_2_workers": beam(2),
    }


def shard_bytes(directory: str) -> list[bytes]:
    out = []
    for path in records.shard_paths(directory):
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def main(argv):
    del argv
    work = tempfile.mkdtemp()
    source_options = dict(num_episodes=FLAGS.episodes, image_size=FLAGS.image_size, num_frames=FLAGS.frames)
    figures, reference = {}, None
    load_before = os.getloadavg()[0]
    for name, run in runs(source_options).items():
        output = os.path.join(work, name)
        start = time.perf_counter()
        summary = run(output)
        seconds = time.perf_counter() - start
        episodes = summary["episodes_converted"]
        figures[name] = dict(
            seconds=seconds,
            episodes_per_second=episodes / seconds,
            frames_per_second=episodes * FLAGS.frames / seconds,
            records=summary["records"],
        )
        # The runner and the worker count must not change a byte of the record set.
        shards = shard_bytes(output)
        reference = reference or shards
        if shards != reference:
            raise AssertionError(f"{name} wrote other shards than the first run")
    rate = lambda name: figures[name]["episodes_per_second"]
    scaling = dict(
        single_machine_2_vs_1_workers=rate("single_machine_2_workers") / rate("single_machine_1_worker"),
        beam_2_vs_1_workers=rate("beam_direct_2_workers") / rate("beam_direct_1_worker"),
        beam_vs_single_machine_2_workers=rate("beam_direct_2_workers") / rate("single_machine_2_workers"),
    )
    print(f"{'run':<26}{'seconds':>9}{'episodes/s':>12}{'frames/s':>10}")
    for name, figure in figures.items():
        print(f"{name:<26}{figure['seconds']:>9.2f}{figure['episodes_per_second']:>12.2f}{figure['frames_per_second']:>10.1f}")
    for name, value in scaling.items():
        print(f"{name}: {value:.2f}")
    result = dict(
        figures=figures,
        scaling=scaling,
        episodes=FLAGS.episodes,
        frames_per_episode=FLAGS.frames,
        image_size=FLAGS.image_size,
        shards=FLAGS.shards,
        identical_shards=True,
        machine=dict(results_io.machine(), load_average_before=load_before),
    )
    results_io.write("convert", result)


if __name__ == "__main__":
    app.run(main)
