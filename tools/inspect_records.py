"""Statistics of a record set and a contact sheet with the hand keypoints drawn on the frames;
with --dump, processed samples (no augmentation, actions unnormalised) in record order.

  caip-inspect /data/records/egodex --sheet /tmp/egodex.png
  caip-inspect /data/records/egodex --dump /tmp/samples.npz --num 32 --tokenizer /data/spm.model
"""
import json

from absl import app, flags

from caip_jax import storage
from caip_jax.data import inspect, pipeline
from tools import check_storage, run_tool

flags.DEFINE_string("sheet", None, "Contact sheet PNG (default: DIR/contact_sheet.png).")
flags.DEFINE_integer("num", 16, "Frames on the sheet, or samples to dump.")
flags.DEFINE_integer("max_records", 10_000, "Statistics over at most this many records, spread over the set.")
flags.DEFINE_string("dump", None, "Write --num processed samples to this .npz.")
flags.DEFINE_string("tokenizer", None, "Sentencepiece model or HF tokenizer directory (for --dump).")
flags.DEFINE_integer("image_size", 256, "Model image size (for --dump).")
flags.DEFINE_integer("text_length", 64, "Text length (for --dump).")
flags.DEFINE_enum("delta", "anchor", ["anchor", "step"], "Action delta mode (for --dump).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: caip-inspect RECORDS_DIR [flags]")
    directory = argv[1]
    sheet = FLAGS.sheet or storage.join(directory, "contact_sheet.png")
    check_storage(reads={"RECORDS_DIR": directory}, writes={"--sheet": sheet, "--dump": FLAGS.dump})
    description = inspect.describe(directory, FLAGS.max_records)
    print(json.dumps({k: v for k, v in description.items() if k != "conversion"}, indent=1))
    inspect.contact_sheet(directory, sheet, FLAGS.num)
    print(f"contact sheet: {sheet}")
    if FLAGS.dump:
        if not FLAGS.tokenizer:
            raise app.UsageError("--dump needs --tokenizer")
        preprocess = pipeline.Preprocess(
            FLAGS.tokenizer, FLAGS.image_size, FLAGS.text_length, description["future_steps"], with_metadata=True
        )
        inspect.dump(directory, preprocess, FLAGS.num, FLAGS.dump, FLAGS.delta)
        print(f"{FLAGS.num} samples: {FLAGS.dump}")


def run():
    run_tool(main)


if __name__ == "__main__":
    run()
