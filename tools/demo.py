"""The README's main job: demo-world records, then training configs/demo.py on this machine.

  caip-demo --workdir workdirs/demo [--config configs/demo.py] [--num_episodes 160]
"""
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
config_flags.DEFINE_config_file("config", DEMO_CONFIG, "The demo config.", lock_config=True)
flags.DEFINE_string("workdir", "workdirs/demo", "Data and the training run go here.")
flags.DEFINE_integer("num_episodes", 160, "Demo-world episodes to generate.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        # Warnings and errors only unless asked: orbax logs every checkpoint write at INFO.
        absl_logging.set_verbosity(absl_logging.WARNING)
    from caip_jax import demo

    logged = demo.run(FLAGS.config, FLAGS.workdir, FLAGS.num_episodes)
    first, last = logged[0], logged[-1]
    print(f"in-batch retrieval top-1 (image + text -> action), chance {last['chance_top1']:.3f}:")
    print(f"  step {first['step']:>4}: {first['top1']:.3f}  (loss {first['loss']:.3f})")
    print(f"  step {last['step']:>4}: {last['top1']:.3f}  (loss {last['loss']:.3f})")
    print(f"metrics: {FLAGS.workdir}/train/metrics.jsonl, TensorBoard: {FLAGS.workdir}/train/tensorboard")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
