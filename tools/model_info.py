"""Prints a config's parameter counts and, with --forward, runs one forward pass on random inputs.

  caip-model-info --config configs/caip_vitl16_256.py
  caip-model-info --config configs/demo.py --forward --batch 4
"""
import time

from absl import flags
from ml_collections import config_flags

from tools import parse_flags, run_tool

config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_bool("forward", False, "Also initialise the model and run one jitted forward pass.")
flags.DEFINE_integer("batch", 2, "Batch size of the forward pass.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from caip_jax.models import dummy_inputs, model_from_config, summary

    model_config = FLAGS.config.model
    counts = summary.parameter_counts(model_config)
    for name, n in counts.items():
        print(f"{name:>6}: {n:>13,d} parameters ({n / 1e6:8.2f} M)")
    if FLAGS.forward:
        model = model_from_config(model_config)
        inputs = dummy_inputs(model_config, FLAGS.batch)
        variables = jax.jit(model.init)(jax.random.key(FLAGS.config.seed), **inputs)
        apply = jax.jit(model.apply)
        jax.block_until_ready(apply(variables, **inputs))  # compile
        start = time.perf_counter()
        outputs = jax.block_until_ready(apply(variables, **inputs))
        print(f"forward of batch {FLAGS.batch} on {jax.devices()[0].platform}: "
              f"{time.perf_counter() - start:.3f} s")
        for name, value in outputs.items():
            print(f"  {name:>16}: {list(value.shape)} {value.dtype}")


def run():
    flags.mark_flag_as_required("config")
    run_tool(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
