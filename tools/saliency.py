"""The paper's saliency maps: where CAIP's text-conditioned pooling looks (stage-2 weights times
stage-1 weights, summed over text tokens), upsampled and overlaid on each frame. Writes one PNG
per image and a contact sheet of all of them to --out; with --encoder hf:PATH, SigLIP's MAP-head
attention or DINOv2's patch PCA on the same frames, a row per model.

  caip-saliency --workdir /runs/l16 --image a.png --text "pick up the red cup" --image b.png --text "open the drawer"
  caip-saliency --workdir /runs/l16 --records /data/test --num 16
  caip-saliency --workdir /runs/l16 --records /data/test --num 8 --encoder hf:/ckpt/siglip2-base-patch16-256 \\
      --encoder hf:/ckpt/dinov2-base
"""
from absl import app, flags

from tools import check_storage, quiet_unless_asked, run_tool

flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/.")
flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_multi_string("image", [], "An image file; give one --text per --image.")
flags.DEFINE_multi_string("text", [], "The instruction of the --image at the same position.")
flags.DEFINE_string("records", "", "Take frames and instructions from this record set instead.")
flags.DEFINE_integer("num", 16, "Records to draw (spread evenly over --records).")
flags.DEFINE_integer("display", 256, "Side of each drawn tile, in pixels.")
flags.DEFINE_string("out", None, "Where the PNGs go (default: WORKDIR/saliency).")
flags.DEFINE_multi_string("encoder", [], "hf:PATH of a SigLIP / SigLIP 2 (MAP-head attention) or DINOv2 (patch "
                          "PCA) model, drawn on the same frames: a row of sheet.png per model (repeatable).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    from caip_jax import storage
    from caip_jax.data import inspect, records

    out = FLAGS.out or storage.join(FLAGS.workdir, "saliency")
    check_storage(reads={"--workdir": FLAGS.workdir, "--records": FLAGS.records,
                         **{f"--image {i}": image for i, image in enumerate(FLAGS.image)}},
                  writes={"--out": out})
    from caip_jax.evaluate import baseline_saliency, features, saliency

    baseline_saliency.check_specs(FLAGS.encoder)

    if FLAGS.records:
        samples = [records.decode(r) for r in inspect.spread_records(FLAGS.records, FLAGS.num)]
        frames, texts = [s["image"] for s in samples], [s["text"] for s in samples]
    elif FLAGS.image and len(FLAGS.image) == len(FLAGS.text):
        frames, texts = list(FLAGS.image), list(FLAGS.text)
    else:
        raise app.UsageError("give --records, or one --text for each --image")
    encoder = features.from_checkpoint(FLAGS.workdir, FLAGS.step)
    tiles = features.saliency_tiles(encoder, frames, texts, FLAGS.display)
    for i, tile in enumerate(tiles):
        saliency.save_png(tile, storage.join(out, f"{i:03d}.png"))
    rows = baseline_saliency.draw(FLAGS.encoder, frames, FLAGS.display, out)
    saliency.save_png(baseline_saliency.sheet(tiles, texts, rows), storage.join(out, "sheet.png"))
    print(f"{len(tiles)} saliency maps in {out}/ (sheet.png: all of them)")


def run():
    flags.mark_flags_as_required(["workdir"])
    run_tool(main)


if __name__ == "__main__":
    run()
