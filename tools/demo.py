"""The README's main job: demo-world records, training configs/demo.py on this machine,
evaluating it against its random init, and exporting it for PyTorch.

  caip-demo --workdir workdirs/demo [--config configs/demo.py] [--num_episodes 160] [--test_episodes 48]
"""
import os

from absl import flags

from tools import define_config_file_with_default, quiet_unless_asked, run_tool

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
define_config_file_with_default(DEMO_CONFIG, "The demo config.", lock_config=True)
flags.DEFINE_string("workdir", "workdirs/demo", "Data and the training run go here.")
flags.DEFINE_integer("num_episodes", 160, "Demo-world episodes to train on.")
flags.DEFINE_integer("test_episodes", 48, "Held-out demo-world episodes to evaluate on.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    from caip_jax import demo, storage

    if storage.is_remote(FLAGS.workdir):  # the demo world is made here: sentencepiece and renders write local files
        raise ValueError(f"--workdir={FLAGS.workdir}: the demo runs on a local directory; the pod workflow "
                         "(README, 'Using it on real data') takes gs:// paths")
    result = demo.run(FLAGS.config, FLAGS.workdir, FLAGS.num_episodes, FLAGS.test_episodes)
    logged, report = result["metrics"], result["report"]
    first, last = logged[0], logged[-1]
    print(f"in-batch retrieval top-1 (image + text -> action), chance {last['chance_top1']:.3f}:")
    print(f"  step {first['step']:>4}: {first['top1']:.3f}  (loss {first['loss']:.3f})")
    print(f"  step {last['step']:>4}: {last['top1']:.3f}  (loss {last['loss']:.3f})")
    print("held-out episodes, frozen image_pooled features (linear probes) and retrieval:")
    for name, row in report.items():
        probe = row["probes"]["image_pooled"]
        accuracy = "  ".join(f"{label} {value:.2f}" for label, value in probe["accuracy"].items())
        recall = row["retrieval"]["image_text_to_action/recall@1"]
        print(f"  {name:>12}: action R² {probe['action_r2']['overall']:.3f}  {accuracy}  recall@1 {recall:.3f}")
    train = f"{FLAGS.workdir}/train"
    print(f"metrics: {train}/metrics.jsonl, TensorBoard: {train}/tensorboard")
    print(f"evaluation: {train}/probe/report.md, {train}/probe/r2_by_horizon.png, {train}/saliency/sheet.png")
    print(f"PyTorch: AutoModel.from_pretrained('{FLAGS.workdir}/hf', trust_remote_code=True)")


def run():
    run_tool(main)


if __name__ == "__main__":
    run()
