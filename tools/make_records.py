"""Converts episodes of a source layout into a record set (ArrayRecord shards + stats.json +
summary.json), in parallel over episodes. Failed episodes are skipped, counted and named; the
exit status is 1 when none converted or more than --max_failure_fraction of them failed (the
record set then holds those that converted).

  caip-make-records --source egodex --input /data/egodex --output /data/records/egodex --workers 16
  caip-make-records --source demo_world --output /tmp/demo/records --option num_episodes=200
  caip-make-records --source demo_world --output /tmp/demo/records --option num_episodes=200 \
      --beam -- --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing
  caip-make-records --source lerobot --input /data/robot --output /data/records/robot \\
      --option video_key=observation.images.head --option right_pose=observation.state[0:7]
"""
import json
import os
import sys

from absl import app, flags

from caip_jax.data import convert
from tools import check_storage, run_tool

flags.DEFINE_enum("source", None, convert.SOURCES, "Layout of the input.")
flags.DEFINE_string("input", "", "Input directory (unused by demo_world).")
flags.DEFINE_string("output", None, "Output directory of the record set.")
flags.DEFINE_integer("workers", os.cpu_count(), "Worker processes (episodes in parallel).")
flags.DEFINE_integer("shards", 8, "Number of ArrayRecord shards.")
flags.DEFINE_integer("horizon", convert.ConvertOptions.horizon, "Future steps per action chunk (T).")
flags.DEFINE_integer("stride", convert.ConvertOptions.stride, "Steps (at 30 Hz) between anchors.")
flags.DEFINE_integer("jpeg_short_side", convert.ConvertOptions.jpeg_short_side, "Short side of stored frames.")
flags.DEFINE_multi_string("option", [], "Source option key=value (value parsed as JSON if it can be).")
flags.DEFINE_bool("beam", False, "Convert on Apache Beam; Beam pipeline options follow `--`.")
flags.DEFINE_float("max_failure_fraction", 0.05, "Above this fraction of failed episodes the tool exits 1 "
                   "(after writing those that converted); at or below it, 0 with a warning.",
                   lower_bound=0.0, upper_bound=1.0)
FLAGS = flags.FLAGS


def parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise app.UsageError(f"--option {text!r} is not key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv):
    check_storage(reads={"--input": FLAGS.input}, writes={"--output": FLAGS.output})
    options = convert.ConvertOptions(
        horizon=FLAGS.horizon, stride=FLAGS.stride, jpeg_short_side=FLAGS.jpeg_short_side
    )
    source_options = dict(parse_option(o) for o in FLAGS.option)
    if FLAGS.beam:
        from caip_jax.data import beam

        summary = beam.convert_with_beam(
            FLAGS.source, FLAGS.input, FLAGS.output, options, source_options, FLAGS.shards, argv[1:]
        )
    elif len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (Beam options need --beam)")
    else:
        summary = convert.convert(
            FLAGS.source, FLAGS.input, FLAGS.output, options, source_options, FLAGS.workers, FLAGS.shards
        )
    print(
        f"{summary['episodes_converted']} of {summary['episodes_listed']} episodes -> "
        f"{summary['records']} records ({summary['bytes_per_record'] / 1024:.1f} KiB each) in "
        f"{FLAGS.output}, {summary['episodes_per_second']:.2f} episodes/s"
    )
    if summary["invalidated_hand_frames"]:
        total = sum(summary["invalidated_hand_frames"].values())
        print(f"  {total} hand-frames with NaN or non-rigid poses masked (per episode in summary.json)")
    if summary["warnings"]:
        print(f"  {summary['episodes_with_warnings']} episodes converted with warnings about their files "
              f"(per episode in summary.json), e.g. {next(iter(summary['warnings'].values()))[0]}")
    report, failed = convert.failure_report(summary, FLAGS.output, FLAGS.max_failure_fraction)
    if report:
        print(report, file=sys.stderr)
    if failed:
        sys.exit(1)


def run():
    flags.mark_flags_as_required(["source", "output"])
    run_tool(main)


if __name__ == "__main__":
    run()
