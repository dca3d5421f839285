"""Judges frozen encoders by control: a flow-matching policy trained on each encoder's features
from the same demonstrations, then closed-loop success on held-out seeds of simulated tasks;
or, for robot datasets with no simulator (--lerobot), held-out action error per chunk step.
Writes results.json, results.md, success_rate.png and rollout GIFs/strips to --out (a local
directory or gs://...); the caches (demonstrations, features, policies, rollouts) go to the local
--cache_dir. `state` (the ceiling) and `blind` (no image: the floor) are judged beside the
encoders given unless --nobaselines.

  caip-policy-eval --encoder random --encoder workdirs/demo --out /tmp/eval     # the default suite
  caip-policy-eval --encoder /runs/l16 --tasks sweep-v3 --demos 10 --episodes 10 --out gs://bucket/eval
  caip-policy-eval --suite maniskill --encoder /runs/l16 --out /tmp/eval_maniskill   # PushCube, LiftPegUpright, StackCube
  caip-policy-eval --encoder hf:/ckpt/dinov2-small --encoder /runs/l16 --lerobot /data/robot \\
      --video_key observation.images.head --out /tmp/offline

ENC: state | blind | random | siglip2:PATH | hf:PATH | a CAIP workdir | a CAIP export.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from tools import check_storage, define_config_file_with_default, quiet_unless_asked, run_tool

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "policy_tiny.py")
define_config_file_with_default(TINY, "A policy config from configs/policy_*.py.")
config_flags.DEFINE_config_file("caip_config", None, "The CAIP config of the random / siglip2: baselines "
                                "(default: the first CAIP workdir or export given).")
flags.DEFINE_multi_string("encoder", [], "An encoder to judge (repeat the flag for several).")
flags.DEFINE_string("out", None, "Where the report and rollout pictures go (a local directory or gs://...).")
flags.DEFINE_string("cache_dir", None, "A local directory for the caches (demonstrations, features, policies, "
                    "rollouts), keyed exactly, so any runs can share it (default: --out if local, else "
                    "~/.cache/caip_jax/policy_eval).")
flags.DEFINE_bool("baselines", True, "Judge `state` (the ceiling) and `blind` (no image) beside the encoders given.")
flags.DEFINE_string("suite", "metaworld", "The simulator of the tasks: metaworld or maniskill.")
flags.DEFINE_list("tasks", None, "Tasks of the suite, comma-separated (default: the suite's default suite; "
                  "Meta-World: sweep-v3, handle-pull-side-v3, dial-turn-v3, handle-pull-v3 and the control "
                  "button-press-v3).")
flags.DEFINE_integer("demos", 50, "Scripted-expert demonstrations per task.")
flags.DEFINE_integer("episodes", 50, "Held-out rollouts per task and encoder.")
flags.DEFINE_integer("seed", 0, "Seeds demonstrations (seed + i), rollouts (seed + 1000000 + j) and training.")
flags.DEFINE_integer("image_size", 128, "Rendered camera frames are this many pixels square.")
flags.DEFINE_string("camera", None, "The suite's camera (Meta-World default: corner; ManiSkill: base_camera).")
flags.DEFINE_integer("max_steps", None, "Steps before an episode counts as failed (Meta-World default: 250; ManiSkill: 200).")
flags.DEFINE_bool("multitask", False, "One policy over all tasks, told apart by the instruction.")
flags.DEFINE_integer("strips", 2, "Rollouts per task and encoder saved as GIF and PNG strip.")
flags.DEFINE_multi_string("lerobot", None, "Offline mode: LeRobot datasets (v2.1 / v3.0) to judge by held-out action error.")
flags.DEFINE_string("video_key", None, "Offline mode: the camera column, e.g. observation.images.head.")
flags.DEFINE_string("state_key", "observation.state", "Offline mode: the proprioception column ('name' or 'name[a:b]').")
flags.DEFINE_string("action_key", "action", "Offline mode: the action column.")
flags.DEFINE_float("held_out", 0.2, "Offline mode: the fraction of episodes (the last ones) held out.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_unless_asked()
    check_storage(writes={"--out": FLAGS.out, "--cache_dir": FLAGS.cache_dir})
    from caip_jax import storage
    from caip_jax.policy import evaluate

    try:
        check_tokenizer(FLAGS.encoder, FLAGS.caip_config)
        if FLAGS.lerobot:
            if not FLAGS.video_key:
                raise ValueError("--lerobot needs --video_key (the camera column, e.g. observation.images.head)")
            run = evaluate.Offline(FLAGS.lerobot, FLAGS.video_key, FLAGS.state_key, FLAGS.action_key, FLAGS.held_out,
                                   FLAGS.seed, cache_dir=FLAGS.cache_dir, baselines=FLAGS.baselines)
            evaluate.evaluate_offline(FLAGS.encoder, FLAGS.config, run, FLAGS.out, FLAGS.caip_config)
        else:
            run = evaluate.Simulated(FLAGS.suite, FLAGS.tasks, FLAGS.demos, FLAGS.episodes, FLAGS.seed,
                                     FLAGS.image_size, FLAGS.camera, FLAGS.max_steps, FLAGS.multitask, FLAGS.strips,
                                     cache_dir=FLAGS.cache_dir, baselines=FLAGS.baselines)
            evaluate.evaluate_simulated(FLAGS.encoder, FLAGS.config, run, FLAGS.out, FLAGS.caip_config)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, no traceback
        sys.exit(f"caip-policy-eval: {error}")
    print(storage.read_text(storage.join(FLAGS.out, "results.md")))
    print(f"report: {storage.join(FLAGS.out, 'results.md')}, {storage.join(FLAGS.out, 'results.json')}")


def check_tokenizer(encoders: list[str], caip_config) -> None:
    """The random and siglip2: baselines tokenise instructions with --caip_config's tokenizer;
    unset, the tokenizer's own error would name an empty path but not the flag to set."""
    built = [e for e in encoders if e == "random" or e.startswith("siglip2:")]
    if built and caip_config is not None and not caip_config.data.tokenizer:
        raise ValueError(
            f"--encoder {built[0]} builds CAIP from --caip_config, whose data.tokenizer is not set: give "
            "--caip_config.data.tokenizer=PATH (SigLIP 2's tokenizer.model, or a Hugging Face directory holding it)"
        )


def run():
    flags.mark_flags_as_required(["out"])
    run_tool(main)


if __name__ == "__main__":
    run()
