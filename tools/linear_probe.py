"""Linear probes (ridge on the action chunk, logistic on the records' labels) and retrieval on
the frozen features of a checkpoint, next to the same architecture at random init (and at
SigLIP 2 init with --siglip2). Writes report.json, report.md and r2_by_horizon.png to --out.

  caip-linear-probe --workdir /runs/l16 --train /data/probe_train --test /data/probe_test --out /runs/l16/probe
"""
from absl import flags

from tools import check_storage, quiet_unless_asked, run_tool

flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/.")
flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_string("train", None, "Records to fit the probes on.")
flags.DEFINE_string("test", None, "Held-out records to score them on.")
flags.DEFINE_string("out", None, "Where the report goes (default: WORKDIR/probe).")
flags.DEFINE_string("siglip2", "", "A SigLIP 2 .npz or HF directory for the SigLIP 2 init baseline row.")
flags.DEFINE_boolean("baselines", True, "Add the random-init row (and the SigLIP 2 one with --siglip2).")
flags.DEFINE_integer("batch_size", 256, "Global batch of the feature extraction.")
flags.DEFINE_integer("max_records", None, "Use at most this many records of each set.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    from caip_jax import storage
    from caip_jax.evaluate import features, linear_probe

    out = FLAGS.out or storage.join(FLAGS.workdir, "probe")
    check_storage(reads={"--workdir": FLAGS.workdir, "--train": FLAGS.train, "--test": FLAGS.test, "--siglip2": FLAGS.siglip2},
                  writes={"--out": out})

    trained = features.from_checkpoint(FLAGS.workdir, FLAGS.step)
    encoders = [trained]
    if FLAGS.baselines:
        encoders.append(features.initialised(trained.config, seed=trained.config.seed))
        if FLAGS.siglip2:
            encoders.append(features.initialised(trained.config, FLAGS.siglip2, seed=trained.config.seed))
    report = linear_probe.evaluate(encoders, FLAGS.train, FLAGS.test, FLAGS.batch_size, FLAGS.max_records)
    linear_probe.write(report, out, f"{FLAGS.workdir} ({trained.name})")
    print(linear_probe.markdown(report))
    print(f"report: {out}/report.md, {out}/report.json, {out}/r2_by_horizon.png")


def run():
    flags.mark_flags_as_required(["workdir", "train", "test"])
    run_tool(main)


if __name__ == "__main__":
    run()
