"""Brings a model exported by caip-export-torch (fine-tuned in PyTorch or not) back as step 0
of a CAIP run; `caip-train` with the same --workdir continues from it.

  caip-import-torch --hf /exports/caip-vitl256 --workdir /runs/l16-back [--config configs/caip_vitl16_256.py]
"""
from absl import flags
from ml_collections import config_flags

from tools import check_storage, parse_flags, quiet_unless_asked, run_tool

flags.DEFINE_string("hf", None, "The Hugging Face directory caip-export-torch wrote.")
flags.DEFINE_string("workdir", None, "The run directory to start.")
config_flags.DEFINE_config_file("config", None, "The run config (default: the directory's caip_config.json); "
                                "the model sizes always come from its config.json.", lock_config=False)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    from caip_jax.export import hf_dir

    check_storage(reads={"--hf": FLAGS.hf}, writes={"--workdir": FLAGS.workdir})
    step = hf_dir.import_torch(FLAGS.hf, FLAGS.workdir, FLAGS.config)
    print(f"wrote step {step} of {FLAGS.workdir} from {FLAGS.hf}")


def run():
    flags.mark_flags_as_required(["hf", "workdir"])
    run_tool(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
