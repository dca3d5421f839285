"""caip-policy-eval end to end on a tiny budget: demonstrations, cached features, a policy per
encoder and task, rollouts, the report with its statistics; a second run reuses everything and
gives the same table; the caches are exact (two workdirs of one name, a workdir trained further,
a kill mid-write); the report can go to object storage; offline mode on the same
demonstrations; bad input stops with one line."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_run_config
from test_policy_encoders import tiny_dinov2

from caip_jax import run_state, storage
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import tokenizer
from caip_jax.policy import cache, demonstrations, encoders, evaluate, feature_cache, train
from caip_jax.policy import config as policy_config

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


def save_caip(workdir: str, config, step: int, seed: int) -> None:
    """A tiny CAIP checkpoint at `step` whose parameters are drawn in numpy from `seed` (no JAX
    initialisation to compile)."""
    config = config.copy_and_resolve_references()
    config.mesh.update(data=1, fsdp=-1)
    rng = np.random.default_rng(seed)
    abstract = run_state.abstract_params(run_state.setup(config))
    draw = lambda path, x: (("scale" in jax.tree_util.keystr(path)) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    checkpoints = Checkpoints(workdir, asynchronous=False)
    checkpoints.save(step, jax.tree_util.tree_map_with_path(draw, abstract), config=config)
    checkpoints.close()


def mtimes(directory: str) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files}


def test_simulated_evaluation_writes_the_table_and_reuses_its_work(tmp_path):
    out = str(tmp_path / "eval")
    run = evaluate.Simulated("metaworld", [TASK], demos=2, episodes=2, image_size=32, max_steps=16, strips=1)
    # No encoder given: the ceiling and the floor alone (CAIP encoders: the next test).
    results = evaluate.evaluate_simulated([], tiny_policy(), run, out)
    assert results["encoders"] == ["state", "blind"]
    assert results["episodes"][TASK] == {"state": 2, "blind": 2}
    assert set(results["successes"][TASK]) == {"state", "blind"} and results["missing"] == []
    assert all(0 <= results["mean_steps"][TASK][e] <= 16 for e in results["encoders"])
    for e in results["encoders"]:
        k = results["successes"][TASK][e]
        assert results["success_rate"][TASK][e] == k / 2 and len(results["wilson95"][TASK][e]) == 2
        assert results["fisher"][TASK][e]["against"] != e
    assert results["controls"] == {TASK: evaluate.environment.controls("metaworld")[TASK]}
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["successes"] == results["successes"]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert f"| encoder | {TASK} (control) | Pooled |" in table and "Two-sided Fisher exact test" in table
    for e in results["encoders"]:
        low, high = results["wilson95"][TASK][e]
        assert f"| {e} | " in table and f"{results['successes'][TASK][e]}/2 " in table
        assert f"[{100 * low:.0f}, {100 * high:.0f}]" in table
    directory = results["encoder_directories"]
    for name in ("success_rate.png", f"rollouts/{TASK}/{directory['state']}_0.gif", f"rollouts/{TASK}/{directory['blind']}_0.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, f"rollouts/{TASK}/{directory['state']}_1.gif"))  # strips=1
    # Again: demonstrations, features, policies and rollouts are read back, not made again, and
    # give the same figures.
    made = {k: v for k, v in mtimes(out).items() if "/rollouts/" not in k and not k.endswith(("results.json", ".md", ".png"))}
    again = evaluate.evaluate_simulated(["state"], tiny_policy(), run, out)
    assert again["encoders"] == ["state", "blind"]
    assert {k: v for k, v in mtimes(out).items() if k in made} == made
    for e in ("state", "blind"):
        assert again["successes"][TASK][e] == results["successes"][TASK][e]
        assert again["mean_steps"][TASK][e] == results["mean_steps"][TASK][e]
    # Offline mode on two copies of the same LeRobot demonstrations whose folders share a name
    # (one episode trains, one is held out), with a Hugging Face vision model.
    tiny_dinov2(str(tmp_path / "dino"))
    demos = os.path.join(out, "demos", next(d for d in os.listdir(os.path.join(out, "demos"))))
    copies = [str(tmp_path / site / TASK) for site in ("lab_a", "lab_b")]
    for copy in copies:
        shutil.copytree(demos, copy)
    offline_run = evaluate.Offline(copies, video_key="observation.images.corner", held_out=0.5, baselines=False)
    scored = evaluate.evaluate_offline([f"hf:{tmp_path / 'dino'}"], tiny_policy(), offline_run, str(tmp_path / "offline"))
    assert scored["datasets"] == [f"lab_a/{TASK}", f"lab_b/{TASK}"]
    for dataset in scored["datasets"]:
        by_step, mse = scored["mse_by_step"][dataset]["hf:dino"], scored["mse"][dataset]["hf:dino"]
        assert len(by_step) == tiny_policy().horizon and mse > 0
    with open(tmp_path / "offline" / "results.md") as f:
        assert "| hf:dino |" in f.read()
    with pytest.raises(ValueError, match="encoder 'state' needs a simulator's state"):
        evaluate.evaluate_offline(["state"], tiny_policy(), offline_run, str(tmp_path / "offline"))


def test_multitask_policy_knows_every_instruction(tmp_path):
    out = str(tmp_path / "eval")
    run = evaluate.Simulated("metaworld", [TASK, "drawer-open-v3"], demos=1, episodes=1, max_steps=8, strips=0,
                             multitask=True, baselines=False)
    results = evaluate.evaluate_simulated(["state"], tiny_policy(), run, out)
    assert set(results["successes"]) == {TASK, "drawer-open-v3"} and results["encoders"] == ["state"]
    (policy_dir,) = os.listdir(os.path.join(out, "policies", results["encoder_directories"]["state"]))
    assert policy_dir.startswith("multitask-")
    policy = train.load(os.path.join(out, "policies", results["encoder_directories"]["state"], policy_dir))
    assert list(policy.config.instructions) == ["button press", "drawer open"]
    # Both tasks are controls: the pooled column pools them both.
    assert results["pooled_tasks"] == [TASK, "drawer-open-v3"] and results["pooled"]["state"]["episodes"] == 2


def features_of(encoder_spec: str, demos: list, step: int | None = None) -> list[np.ndarray]:
    encoder = encoders.load(encoder_spec, "pooled", None, cache="", step=step)
    return [feature_cache.episode_features(encoder, d) for d in demos]


def test_caches_are_exact_for_same_named_and_retrained_workdirs(tmp_path, bucket):
    """Two CAIP workdirs /a/run and /b/run: two table rows and two caches, each holding its own
    encoder's features (they shared one before). /a/run trained further: its features and
    policy are made again, /b/run's are kept. The report goes to a gs:// bucket, the caches to a
    local directory, and no local folder named `gs:` appears."""
    caip = tiny_caip(tmp_path)
    workdirs = [str(tmp_path / site / "run") for site in ("a", "b")]
    for seed, workdir in enumerate(workdirs):
        save_caip(workdir, caip, step=1, seed=seed)
    out, cache_dir = f"{bucket}/eval", str(tmp_path / "cache")
    run = evaluate.Simulated("metaworld", [TASK], demos=1, episodes=1, image_size=32, max_steps=8, strips=1,
                             cache_dir=cache_dir, baselines=False)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        results = evaluate.evaluate_simulated(workdirs, tiny_policy(), run, out)
    finally:
        os.chdir(cwd)
    assert results["encoders"] == ["caip:a/run", "caip:b/run"]
    directories = results["encoder_directories"]
    assert directories["caip:a/run"] != directories["caip:b/run"]
    assert all(d.startswith("caip-a-run-") or d.startswith("caip-b-run-") for d in directories.values())
    demos_root = os.path.join(cache_dir, "demos", os.listdir(os.path.join(cache_dir, "demos"))[0])
    demos = demonstrations.read(demos_root, video_key="observation.images.corner")
    stored = lambda name: np.load(os.path.join(cache_dir, "features", directories[name], f"{TASK}.npz"))
    for name, workdir in zip(results["encoders"], workdirs):
        np.testing.assert_allclose(stored(name)[demos[0].key], features_of(workdir, demos)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(stored("caip:a/run")[demos[0].key], stored("caip:b/run")[demos[0].key], atol=1e-3)
    # The report is in the bucket, and nothing went to a local folder named after the URL.
    assert storage.read_json(f"{out}/results.json")["successes"] == results["successes"]
    assert "| caip:a/run |" in storage.read_text(f"{out}/results.md")
    assert storage.exists(f"{out}/rollouts/{TASK}/{directories['caip:a/run']}_0.gif")
    for where in (tmp_path, cwd, cache_dir):
        assert not os.path.exists(os.path.join(where, "gs:")), where
    # /a/run trained further: a new step, new weights.
    save_caip(workdirs[0], caip, step=2, seed=7)
    kept = mtimes(os.path.join(cache_dir, "features", directories["caip:b/run"]))
    again = evaluate.evaluate_simulated(workdirs, tiny_policy(), run, out)
    new = again["encoder_directories"]
    assert new["caip:b/run"] == directories["caip:b/run"] and new["caip:a/run"] != directories["caip:a/run"]
    assert mtimes(os.path.join(cache_dir, "features", new["caip:b/run"])) == kept
    retrained = np.load(os.path.join(cache_dir, "features", new["caip:a/run"], f"{TASK}.npz"))[demos[0].key]
    np.testing.assert_allclose(retrained, features_of(workdirs[0], demos, step=2)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(retrained, stored("caip:a/run")[demos[0].key], atol=1e-3)
    policies = os.listdir(os.path.join(cache_dir, "policies"))
    assert sorted(policies) == sorted({*directories.values(), new["caip:a/run"]})  # a's policy trained again


KILLED_WRITE = """
import os, signal, sys
import numpy as np
from caip_jax.policy import feature_cache
from caip_jax.policy.demonstrations import Demonstration

real = np.savez
def savez(file, **arrays):  # writes half of the file, then the process is killed
    import io
    buffer = io.BytesIO()
    real(buffer, **arrays)
    data = buffer.getvalue()
    target = open(file, "wb") if isinstance(file, str) else file
    target.write(data[: len(data) // 2])
    target.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = savez

class Counting:
    name, needs_images = "counting", False
    def encode(self, images, texts, env_states):
        return np.asarray(env_states, np.float32)[:, None] * 2
demos = [Demonstration(None, np.zeros((3, 4)), np.zeros((3, 4)), np.arange(6.0).reshape(3, 2), "t", "episode_000000")]
feature_cache.cached_features(Counting(), demos, sys.argv[1], {"encoder": "counting"})
"""


class Counting:
    """An encoder that counts its calls: features = 2 x the simulator state."""

    name, needs_images = "counting", False

    def __init__(self):
        self.calls = 0

    def encode(self, images, texts, env_states):
        self.calls += 1
        return np.asarray(env_states, np.float32)[:, None] * 2


def test_feature_cache_survives_a_kill_mid_write_and_refuses_foreign_files(tmp_path):
    """A process killed while writing the features leaves no half file to trip the next run;
    a damaged file, or one written for another encoder, is computed again."""
    path = str(tmp_path / "features" / "task.npz")
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, path], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == -9, done.stderr[-2000:]
    demos = [demonstrations.Demonstration(None, np.zeros((3, 4)), np.zeros((3, 4)), np.arange(6.0).reshape(3, 2), "t",
                                          "episode_000000")]
    want = np.arange(6.0).reshape(3, 1, 2) * 2
    encoder = Counting()
    got = feature_cache.cached_features(encoder, demos, path, {"encoder": "counting"})
    np.testing.assert_array_equal(got[0], want)
    assert encoder.calls == 1
    # Read back without computing; for another identity, computed again (and that one kept).
    np.testing.assert_array_equal(feature_cache.cached_features(encoder, demos, path, {"encoder": "counting"})[0], want)
    assert encoder.calls == 1
    feature_cache.cached_features(encoder, demos, path, {"encoder": "counting", "step": 2})
    assert encoder.calls == 2
    with open(path, "r+b") as f:  # damaged on disk
        f.truncate(os.path.getsize(path) // 3)
    np.testing.assert_array_equal(feature_cache.cached_features(encoder, demos, path, {"encoder": "counting", "step": 2})[0], want)
    assert encoder.calls == 3
    assert not [name for name in os.listdir(tmp_path / "features") if name != "task.npz"]  # no partial files left


def test_names_that_collide_are_told_apart_readably():
    assert cache.distinct_names(["caip:run", "caip:run", "random"], ["/x/a/run", "/x/b/run", None]) == \
        ["caip:a/run", "caip:b/run", "random"]
    assert cache.distinct_names(["caip:run", "caip:run"], ["/a/same/run", "/b/same/run"]) == ["caip:a/same/run", "caip:b/same/run"]
    assert cache.distinct_names(["hf:m", "hf:m"], [None, None]) == ["hf:m", "hf:m#2"]
    identity = dict(encoder="caip_workdir", step=3)
    assert cache.directory_name("caip:a/run", identity) == f"caip-a-run-{cache.key(identity)[:8]}"
    assert cache.directory_name("caip:a/run", identity) != cache.directory_name("caip:a/run", dict(identity, step=4))
    # The policy's key covers the data it trains on: other features, another key.
    config = tiny_policy()
    rows = lambda x: train.TrainingSet.build([np.full((4, 1, 2), x)], [np.zeros((4, 4))], [np.zeros((4, 4))], ["t"], 8)
    assert train.fitted_config(config, rows(0.0)).data_hash != train.fitted_config(config, rows(1.0)).data_hash


def test_bad_input_stops_with_one_line(tmp_path):
    missing = str(tmp_path / "nowhere")
    for args, message in (
        (["--encoder", missing], f"caip-policy-eval: encoder '{missing}' is neither a CAIP workdir"),
        (["--encoder", "state", "--tasks", "button-smash-v3"],
         "caip-policy-eval: metaworld task 'button-smash-v3' is unknown; valid: assembly-v3"),
        (["--suite", "robosuite"], "caip-policy-eval: suite 'robosuite' is unknown; valid: metaworld, maniskill"),
        # Before any demonstration is made (a run once stopped here after 35 minutes of work).
        (["--encoder", "random", "--tasks", "button-press-v3"],
         "caip-policy-eval: encoder 'random' needs a CAIP config: give a CAIP workdir or export"),
        (["--encoder", "state", "--config.optim.lr=1e-3"],
         "FATAL Flags parsing error: config.optim.lr: config.optim has no field 'lr'; did you mean config.optim.learning_rate?"),
    ):
        done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "policy_eval.py"), "--out", str(tmp_path), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-500:]
        assert not os.path.exists(tmp_path / "demos")
