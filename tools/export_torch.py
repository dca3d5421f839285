"""Writes a Hugging Face model directory from a CAIP checkpoint, loadable in PyTorch with
`AutoModel.from_pretrained(OUT, trust_remote_code=True)` and `AutoProcessor` (no JAX needed).

  caip-export-torch --workdir /runs/l16 --out /exports/caip-vitl256 [--step N] [--dtype bfloat16]
"""
from absl import flags

from tools import check_storage, quiet_unless_asked, run_tool

flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/.")
flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The dtype of the exported weights.")
flags.DEFINE_string("tokenizer", "", "The sentencepiece model, if not the run's data.tokenizer.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    check_storage(reads={"--workdir": FLAGS.workdir, "--tokenizer": FLAGS.tokenizer}, writes={"--out": FLAGS.out})
    from caip_jax.export import hf_dir

    written = hf_dir.export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.dtype, FLAGS.tokenizer)
    print(f"exported step {written['step']} of {FLAGS.workdir} to {FLAGS.out}: {written['tensors']} tensors, "
          f"{written['bytes'] / 1e9:.2f} GB in {written['seconds']:.1f} s")


def run():
    flags.mark_flags_as_required(["workdir", "out"])
    run_tool(main)


if __name__ == "__main__":
    run()
