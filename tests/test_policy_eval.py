"""caip-policy-eval end to end on a tiny budget: demonstrations, cached features, a policy per
encoder and task, rollouts, the report; a second run reuses everything and gives the same
table; offline mode on the same demonstrations; bad input stops with one line."""
import json
import os
import subprocess
import sys

import pytest
import tiny_run_config
from test_policy_encoders import tiny_dinov2

from caip_jax.data import tokenizer
from caip_jax.policy import config as policy_config
from caip_jax.policy import evaluate, train

TASK = "button-press-v3"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_caip(root) -> "ml_collections.ConfigDict":  # noqa: F821
    config = tiny_run_config.get_config()
    config.data.tokenizer = tokenizer.train_sentencepiece(["button press", "drawer open"] * 30, str(root / "spm"), 284)
    return config


def tiny_policy():
    config = policy_config.policy_config("tiny")
    config.total_steps, config.batch_size = 20, 16
    config.model.depth = 1  # half the compile time; what is tested here is the plumbing
    return config


def mtimes(directory: str) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files}


def test_simulated_evaluation_writes_the_table_and_reuses_its_work(tmp_path):
    out = str(tmp_path / "eval")
    run = evaluate.Simulated("metaworld", [TASK], demos=2, episodes=2, image_size=32, max_steps=16, strips=1)
    caip = tiny_caip(tmp_path)
    results = evaluate.evaluate_simulated(["state", "random"], tiny_policy(), run, out, caip)
    assert results["encoders"] == ["state", "random"]
    assert set(results["success_rate"][TASK]) == {"state", "random"}
    assert results["episodes"][TASK] == {"state": 2, "random": 2}
    assert all(0 <= results["mean_steps"][TASK][e] <= 16 for e in results["encoders"])
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["success_rate"] == results["success_rate"]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert f"| encoder | {TASK} | Avg. |" in table and "| state |" in table and "| random |" in table and "**" in table
    for name in ("success_rate.png", f"rollouts/{TASK}/state_0.gif", f"rollouts/{TASK}/random_0.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, f"rollouts/{TASK}/state_1.gif"))  # strips=1
    # Again (the state encoder): demonstrations, features and policies are read back, not made
    # again, and the rollouts (functions of their seeds) give the same figures.
    made = {k: v for k, v in mtimes(out).items() if "/rollouts/" not in k and "random" not in k
            and not k.endswith(("results.json", ".md", ".png"))}
    again = evaluate.evaluate_simulated(["state"], tiny_policy(), run, out)
    assert {k: v for k, v in mtimes(out).items() if k in made} == made
    assert again["success_rate"][TASK]["state"] == results["success_rate"][TASK]["state"]
    assert again["mean_steps"][TASK]["state"] == results["mean_steps"][TASK]["state"]
    # Offline mode on the same LeRobot demonstrations (one episode trains, one is held out),
    # with a Hugging Face vision model.
    tiny_dinov2(str(tmp_path / "dino"))
    demos = os.path.join(out, "demos", TASK)
    offline_run = evaluate.Offline([demos], video_key="observation.images.corner", held_out=0.5)
    scored = evaluate.evaluate_offline([f"hf:{tmp_path / 'dino'}"], tiny_policy(), offline_run, str(tmp_path / "offline"))
    by_step, mse = scored["mse_by_step"][TASK]["hf:dino"], scored["mse"][TASK]["hf:dino"]
    assert len(by_step) == tiny_policy().horizon and mse > 0
    with open(tmp_path / "offline" / "results.md") as f:
        assert "| hf:dino |" in f.read()
    with pytest.raises(ValueError, match="encoder 'state' needs a simulator's state"):
        evaluate.evaluate_offline(["state"], tiny_policy(), offline_run, str(tmp_path / "offline"))


def test_multitask_policy_knows_every_instruction(tmp_path):
    out = str(tmp_path / "eval")
    run = evaluate.Simulated("metaworld", [TASK, "drawer-open-v3"], demos=1, episodes=1, max_steps=8, strips=0,
                             multitask=True)
    results = evaluate.evaluate_simulated(["state"], tiny_policy(), run, out)
    assert set(results["success_rate"]) == {TASK, "drawer-open-v3"}
    policy = train.load(os.path.join(out, "policies", "state", "multitask"))
    assert list(policy.config.instructions) == ["button press", "drawer open"]


def test_bad_input_stops_with_one_line(tmp_path):
    missing = str(tmp_path / "nowhere")
    for args, message in (
        (["--encoder", missing], f"caip-policy-eval: encoder '{missing}' is neither a CAIP workdir"),
        (["--encoder", "state", "--tasks", "button-smash-v3"],
         "caip-policy-eval: metaworld task 'button-smash-v3' is unknown; valid: assembly-v3"),
        (["--encoder", "state", "--config.optim.lr=1e-3"],
         "FATAL Flags parsing error: config.optim.lr: config.optim has no field 'lr'; did you mean config.optim.learning_rate?"),
    ):
        done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "policy_eval.py"), "--out", str(tmp_path), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-500:]
