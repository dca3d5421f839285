"""Trains CAIP. Every process of a multi-host run starts this with the same flags.

  caip-train --config configs/caip_vitl16_256.py --workdir gs://bucket/run \\
      --config.data.train=gs://bucket/records --config.data.tokenizer=gs://bucket/gemma.model \\
      --multihost                                     # TPU pod: jax.distributed.initialize()
  caip-train --config configs/demo.py --workdir /tmp/run --config.data.train=... \\
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0   # explicit

Exit status: 0 finished, 75 preempted (SIGTERM) after saving a checkpoint (run it again to
resume), 1 an error.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from tools import check_storage, parse_flags, quiet_unless_asked, run_tool

config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS


def initialize_distributed():
    """Before anything touches the JAX backend: join the other processes, if any."""
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()


def check_paths(config) -> None:
    """Every path the run reads or writes, before the run (and the other processes) start."""
    from caip_jax.data import pipeline

    reads = {f"--config.data.train ({s.name})": s.path for s in pipeline.parse_sources(config.data.train)}
    reads.update({"--config.data.tokenizer": config.data.tokenizer, "--config.init.siglip2": config.init.siglip2})
    check_storage(reads=reads, writes={"--workdir": FLAGS.workdir})


def main(argv):
    del argv
    quiet_unless_asked()
    check_paths(FLAGS.config)
    initialize_distributed()
    from caip_jax import train

    try:
        train.train(FLAGS.config, FLAGS.workdir)
    except train.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(train.PREEMPTED_EXIT_CODE)


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    run_tool(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
