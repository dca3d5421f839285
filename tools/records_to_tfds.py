"""Writes a record set as the TFDS dataset `caip_records`, which `tfds.data_source` opens.

  caip-records-to-tfds --records /data/records/egodex --data_dir /data/tfds
  # then: tfds.data_source("caip_records", data_dir="/data/tfds", split="train")
  # or train on it: --config.data.train=/data/tfds/caip_records/1.0.0
"""
from absl import flags

from tools import run_tool

from caip_jax.data import tfds_builder

flags.DEFINE_string("records", None, "A record set directory (from caip-make-records).")
flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    builder = tfds_builder.build(FLAGS.records, FLAGS.data_dir)
    print(f"{builder.info.splits['train'].num_examples} examples in {builder.data_dir}")


def run():
    flags.mark_flags_as_required(["records", "data_dir"])
    run_tool(main)


if __name__ == "__main__":
    run()
