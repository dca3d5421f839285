"""Writes step 0 of a CAIP checkpoint whose image and text towers (and t, b) are SigLIP 2's;
`caip-train` with the same --workdir continues from it (creating the optimizer state).

  caip-import-siglip2 --config configs/caip_vitl16_256.py --hf /ckpt/siglip2-large-patch16-256 --workdir /runs/l16
  caip-import-siglip2 --config configs/caip_vitb16_256.py --npz /ckpt/siglip2_b16_256.npz --workdir /runs/b16
"""
from absl import app, flags
from ml_collections import config_flags

from tools import check_storage, parse_flags, quiet_unless_asked, run_tool

config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("hf", None, "A Hugging Face SigLIP 2 directory (config.json + safetensors).")
flags.DEFINE_string("npz", None, "A big_vision SigLIP 2 .npz checkpoint.")
flags.DEFINE_string("workdir", None, "The run directory to start.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    if bool(FLAGS.hf) == bool(FLAGS.npz):
        raise app.UsageError("give exactly one of --hf and --npz")
    check_storage(reads={"--hf": FLAGS.hf, "--npz": FLAGS.npz}, writes={"--workdir": FLAGS.workdir})
    from caip_jax import train

    step = train.import_siglip2(FLAGS.config, FLAGS.hf or FLAGS.npz, FLAGS.workdir)
    print(f"wrote step {step} of {FLAGS.workdir} from {FLAGS.hf or FLAGS.npz}")


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    run_tool(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
