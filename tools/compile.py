"""Compiles the training step of a config for a TPU slice, on a host without one, and reports
whether it fits and what a step costs (memory per device, FLOPs, estimated step time).

  caip-compile --config configs/caip_vitl16_256.py --topology v5p:4x4x4 --out plan.json
  caip-compile --config configs/caip_vitl16_256.py --topology v4:4x4x4 --chip_config megacore \\
      --config.batch_size=32768 --config.model.remat_policy=full
  caip-compile --config configs/demo.py --topology gpu            # this host's GPUs
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

from tools import parse_flags, quiet_unless_asked, run_tool

config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("topology", None, "A TPU topology (v5p:4x4x4, v4:4x4x4, v5e:16x16, v6e:8x8) or 'gpu'.")
flags.DEFINE_integer("num_slices", 1, "Number of slices of --topology (multi-slice).")
flags.DEFINE_string("chip_config", "", "'megacore' for v4: one device per chip, as in training.")
flags.DEFINE_float("mfu", 0.5, "Fraction of the chip's peak FLOP/s the step time is estimated at.")
flags.DEFINE_string("out", "", "Also write the report here (JSON).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    import jax

    if FLAGS.topology != "gpu":
        # The topology's devices are compile-only: no local backend is needed (or wanted).
        jax.config.update("jax_platforms", "cpu")
    from caip_jax import aot

    try:
        devices = aot.topology_devices(FLAGS.topology, FLAGS.num_slices, FLAGS.chip_config)
        source = config_flags.get_config_filename(FLAGS["config"])
        report = aot.compile_step(FLAGS.config, devices, source=source, mfu=FLAGS.mfu)
    except ValueError as error:  # the config or topology: one line that says what to change
        sys.exit(f"caip-compile: {error}")
    report = dict(config=source, topology=FLAGS.topology, num_slices=FLAGS.num_slices, **report)
    text = json.dumps(report, indent=2)
    print(text)
    if FLAGS.out:
        from caip_jax import storage

        storage.write_text(FLAGS.out, text + "\n")


def run():
    flags.mark_flags_as_required(["config", "topology"])
    run_tool(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
