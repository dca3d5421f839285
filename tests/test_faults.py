"""Faults a pod job meets, caused on the tiny run: damaged checkpoints, a non-finite loss,
preemption and SIGKILL at random moments, config mistakes. Each test asserts what the program
then does: a continuation equal to the undisturbed run where a fallback applies, otherwise an
error naming what is wrong and the fix. (Record-set and loader faults: test_faults_data.py.)"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax._src.compilation_cache import decompress_executable

import tiny_run_config
from caip_jax import run_state, train
from caip_jax.checkpoint import CheckpointMismatch, Checkpoints
from test_train import config_flags, final_params, launch, metrics, run_config, wait_for

EVERY = 2  # checkpoint interval of these runs: steps 2, 4, 6 of 6 are kept


def faults_config(record_set):
    config = run_config(record_set)
    config.checkpoint.every_steps = EVERY
    return config


@pytest.fixture(scope="module")
def straight(record_set, tmp_path_factory):
    """An undisturbed 6-step run, checkpoints at 2, 4 and 6: the oracle and the copy to damage."""
    workdir = str(tmp_path_factory.mktemp("faults") / "straight")
    train.train(faults_config(record_set), workdir)
    return workdir


def damaged_copy(straight, tmp_path, damage):
    """A copy of the straight run without its final step (so that training has steps left) and
    with `damage(step_4_directory)` done to its newest remaining step."""
    workdir = str(tmp_path / "damaged")
    shutil.copytree(straight, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    damage(os.path.join(workdir, "checkpoints", "4"))
    return workdir


def truncate_array_files(directory):
    """Cuts every array data file (TensorStore's OCDBT `d/` files) of `directory` in half."""
    for folder, _, names in os.walk(directory):
        for name in names if os.path.basename(folder) == "d" else ():
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)


DAMAGES = {
    "opt_state item missing": lambda step: shutil.rmtree(os.path.join(step, "opt_state")),
    "data item missing": lambda step: shutil.rmtree(os.path.join(step, "data")),
    "params array files truncated": lambda step: truncate_array_files(os.path.join(step, "params")),
    "params _METADATA deleted": lambda step: os.remove(os.path.join(step, "params", "_METADATA")),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(DAMAGES))
def test_a_damaged_latest_step_falls_back_to_the_intact_one_before(fault, record_set, straight, tmp_path, caplog):
    """Restore is all-or-nothing per step: the damaged step 4 is reported by name and step 2
    is used; the run then ends bitwise equal to the undisturbed one (never a fresh optimizer or
    iterator in place of a missing one)."""
    config = faults_config(record_set)
    workdir = damaged_copy(straight, tmp_path, DAMAGES[fault])
    with caplog.at_level(logging.WARNING):
        train.train(config, workdir)
    assert "checkpoint step 4" in caplog.text and "trying the step before" in caplog.text
    assert "restored step 2" in caplog.text
    aside = os.listdir(os.path.join(workdir, "unusable_checkpoints"))  # kept, not deleted
    assert len(aside) == 1 and aside[0].startswith("4.")
    (step_a, a), (step_b, b) = final_params(config, straight), final_params(config, workdir)
    assert step_a == step_b == config.total_steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    expected, got = metrics(straight), metrics(workdir)  # later lines of a step win
    for step in range(3, config.total_steps + 1):
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["seen_train"] == expected[step]["seen_train"] == step * config.batch_size


def test_no_intact_step_is_an_error_naming_each(record_set, straight, tmp_path):
    config = faults_config(record_set)
    workdir = damaged_copy(straight, tmp_path, DAMAGES["opt_state item missing"])
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "data"))
    with pytest.raises(RuntimeError) as error:
        train.train(config, workdir)
    message = str(error.value)
    assert "step 4: UnusableStep: incomplete, no opt_state" in message
    assert "step 2: UnusableStep: incomplete, no data" in message
    assert "Restore the files, or move the directory away" in message


def test_resuming_with_another_number_of_loader_processes_is_refused_naming_both(record_set, straight, tmp_path):
    """grain's iterator state is per loader process and grain's own error is a bare KeyError,
    which made every step look unusable; the refusal names the value to resume with, and every
    step stays where it is."""
    config = faults_config(record_set)
    config.data.workers = 1
    workdir = str(tmp_path / "resumed")
    shutil.copytree(straight, workdir)
    expected = r"step 6 in .* data.workers=0, the config has data.workers=1: .* --config.data.workers=0$"
    with pytest.raises(CheckpointMismatch, match=expected):
        train.train(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))


def strict_json_lines(path):
    """metrics.jsonl as a JSON reader that refuses NaN and Infinity sees it."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def diverging_config(record_set, policy):
    config = run_config(record_set)
    # Updates of ~1e30 make the next forward pass overflow; no weight decay, so that a finite
    # gradient never makes the parameters themselves infinite.
    config.optim.learning_rate, config.optim.grad_clip_norm, config.optim.weight_decay = 1e30, 0.0, 0.0
    config.checkpoint.every_steps, config.checkpoint.keep = 1, 10
    config.nonfinite.policy = policy
    return config


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(record_set, tmp_path):
    config = diverging_config(record_set, "stop")
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError) as error:
        train.train(config, workdir)
    bad = int(str(error.value).split(":")[0].removeprefix("step "))
    assert "stopped before saving it" in str(error.value)
    logged = strict_json_lines(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in logged] == list(range(1, bad)) and all(np.isfinite(m["loss"]) for m in logged)
    checkpoints = Checkpoints(workdir)
    saved = sorted(checkpoints._manager.all_steps())
    assert saved == list(range(1, bad))
    abstract = run_state.abstract_params(run_state.setup(config))
    for step in saved:
        params = checkpoints.restore(step, abstract)["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
    checkpoints.close()


def test_skip_policy_skips_exactly_the_non_finite_updates(record_set, tmp_path):
    config = diverging_config(record_set, "skip")
    config.nonfinite.max_consecutive = config.total_steps
    workdir = str(tmp_path / "run")
    last = train.train(config, workdir)
    logged = {m["step"]: m for m in strict_json_lines(os.path.join(workdir, "metrics.jsonl"))}
    bad = [s for s, m in logged.items() if m["loss"] is None or m["grad_norm"] is None]
    assert bad, "the learning rate should have made some step non-finite"
    assert last["skipped_updates"] == len(bad)
    checkpoints = Checkpoints(workdir)
    abstract = run_state.abstract_params(run_state.setup(config))
    params = {s: jax.device_get(checkpoints.restore(s, abstract)["params"]) for s in range(1, config.total_steps + 1)}
    checkpoints.close()
    for step in range(2, config.total_steps + 1):
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[step - 1]), jax.tree.leaves(params[step])))
        assert same == (step in bad), step


def test_too_many_skipped_updates_in_a_row_stop_the_run(record_set, tmp_path):
    config = diverging_config(record_set, "skip")
    config.nonfinite.max_consecutive = 1
    with pytest.raises(train.NonFiniteError, match="non-finite steps in a row"):
        train.train(config, str(tmp_path / "run"))


def test_a_resumed_run_keeps_its_action_statistics(record_set, tmp_path, caplog):
    """A rebuilt record set (other stats.json) does not change the action space of a resumed
    run: it continues exactly as it would have with the original statistics, and says so."""
    records, tokenizer = record_set
    copied = str(tmp_path / "records")
    shutil.copytree(records, copied)
    config = faults_config((copied, tokenizer))
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    stats_path = os.path.join(copied, "stats.json")
    with open(stats_path) as f:
        stats = json.load(f)
    stats[config.data.delta]["std"] = (np.asarray(stats[config.data.delta]["std"]) * 3).tolist()
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    expected = metrics(workdir)
    with caplog.at_level(logging.WARNING):
        train.train(config, workdir)
    assert "continues with the checkpoint's" in caplog.text
    got = metrics(workdir)
    assert got[5]["loss"] == expected[5]["loss"] and got[6]["loss"] == expected[6]["loss"]


def test_records_of_another_horizon_are_refused_naming_both(record_set):
    config = run_config(record_set)
    config.model.action.horizon = 4  # the fixture's records were converted with horizon 8
    with pytest.raises(ValueError, match=r"converted with horizon 8 .* model.action.horizon=4"):
        run_state.action_stats(config)


def test_config_mistakes_name_the_field_and_the_fix(record_set):
    config = run_config(record_set)
    config.data.tokenizer = ""
    with pytest.raises(ValueError, match=r"data.tokenizer is not set: give SigLIP 2's tokenizer"):
        train.train(config, "/nonexistent/never-written")
    config = run_config(record_set)
    config.batch_size = 12  # 8 devices: data 2 x fsdp 4
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the batch axes data x fsdp = 8 .* batch_size=16"):
        run_state.setup(config)
    config = run_config(record_set, data=1, fsdp=8)
    config.model.action.width = 21
    with pytest.raises(ValueError, match=r"config.mesh=.* splits dimension .* of parameter \['act'\].* does not divide it: make fsdp at most 7"):
        run_state.setup(config)


def test_an_unknown_config_field_names_its_path_and_the_closest(record_set, tmp_path):
    """On the command line, where the mistake is made: exit 1 with one line, no traceback; in
    caip-train, and in caip-demo, whose --config has a default file (caip-policy-eval's case:
    test_policy_eval.py)."""
    for tool, flags in (("tools.train", config_flags(run_config(record_set), tmp_path / "run")),
                        ("tools.demo", [f"--workdir={tmp_path / 'demo'}"])):
        result = subprocess.run(
            [sys.executable, "-m", tool, *flags, "--config.optim.lr=1e-3"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__)),
        )
        assert result.returncode == 1, (tool, result.stderr[-2000:])
        assert "config.optim has no field 'lr'; did you mean config.optim.learning_rate?" in result.stderr, tool
        assert "Traceback" not in result.stderr, tool


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resuming_ends_bitwise_equal(record_set, tmp_path):
    """SIGKILL of caip-train at moments drawn at random, one of them while a checkpoint is being
    written (its temporary directory present), one during start-up or restore; each restart
    resumes; the run ends (exit 0) bitwise equal to an undisturbed run."""
    config = run_config(record_set)
    config.checkpoint.every_steps = 1  # the tiny config's 6 steps: its step program is in the cache
    # The tests' compilation cache: an entry a SIGKILL cuts short is removed by the next start.
    flags = config_flags(config, str(tmp_path / "killed")) + ["--config.checkpoint.every_steps=1"]
    straight = str(tmp_path / "straight")
    train.train(config, straight)

    workdir = str(tmp_path / "killed")
    checkpoints = os.path.join(workdir, "checkpoints")
    rng = np.random.default_rng(0)
    logged_steps = lambda: len(metrics(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else 0
    writing = lambda: os.path.isdir(checkpoints) and any("tmp" in name for name in os.listdir(checkpoints))
    moments = [
        ("while a checkpoint is written", writing),
        ("at start-up or restore", lambda: True),
        ("after a logged step", lambda: logged_steps() >= 1),
    ]
    for name, moment in moments:
        process = launch(flags, devices=8)
        wait_for(lambda: moment() or process.poll() is not None)
        time.sleep(rng.uniform(0, 0.5) if name != "while a checkpoint is written" else 0)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    process = launch(flags, devices=8)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    (step_a, a), (step_b, b) = final_params(config, straight), final_params(config, workdir)
    assert step_a == step_b == config.total_steps
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_restart_compiles_nothing_new_and_an_entry_cut_short_is_written_again(record_set, tmp_path, caplog):
    """The second start of a run loads its programs from the persistent compilation cache: cache
    hits, and no entry is added. An entry cut short (a kill mid-write) is removed by the next
    start, which names it and writes it whole again; JAX alone would keep it and recompile its
    program at every start."""
    config = run_config(record_set)
    config.total_steps, config.compilation_cache = 2, "{workdir}/compilation_cache"  # the default, not the tests'
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    cache = os.path.join(workdir, "compilation_cache")
    entries = set(os.listdir(cache))
    hits = []
    listener = lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
    jax.monitoring.register_event_listener(listener)
    try:
        train.train(config, workdir)  # nothing left to train: restores, compiles the step, exits
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert hits, "the restart should have read compiled programs from the cache"
    assert set(os.listdir(cache)) == entries

    # The training step's entry (jit(step)): a restart compiles it even with nothing left to train.
    step = max((os.path.join(cache, name) for name in entries if name.startswith("jit_step-")), key=os.path.getsize)
    whole = os.path.getsize(step)
    os.truncate(step, whole // 2)
    with caplog.at_level(logging.WARNING):
        train.train(config, workdir)
    assert f"removing {step}, which does not read" in caplog.text
    assert set(os.listdir(cache)) == entries
    decompress_executable(open(step, "rb").read())  # JAX's own reader: raises if the entry is still cut short
