"""Training: exact resume after SIGTERM, sharded parameters, multi-host against one host,
starting from SigLIP 2."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

import tiny
import tiny_run_config
from caip_jax import run_state, train
from caip_jax.checkpoint import Checkpoints
from caip_jax.init import siglip2
from caip_jax.models import summary


def run_config(record_set, **mesh):
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    config.mesh.update(mesh)
    return config


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def final_params(config, workdir):
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    params = checkpoints.restore(step, run_state.abstract_params(run_state.setup(config)))["params"]
    checkpoints.close()
    return step, jax.device_get(params)


def sigterm_after(workdir, step):
    """SIGTERM to this process once `step` is logged, as a pod's preemption notice would come."""

    def watch():
        while True:
            path = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(path) and step in metrics(workdir):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def test_sigterm_saves_and_resuming_is_exact(record_set, tmp_path):
    config = run_config(record_set)
    straight = str(tmp_path / "straight")
    train.train(config, straight)

    interrupted = str(tmp_path / "interrupted")
    sigterm_after(interrupted, 2)
    with pytest.raises(train.Preempted) as preempted:
        train.train(config, interrupted)
    stopped = Checkpoints(interrupted).latest_step()
    assert 2 <= stopped == preempted.value.step < config.total_steps, "SIGTERM should stop the run early with a checkpoint"
    train.train(config, interrupted)  # resumes from `stopped`: params, optimizer, data iterator

    expected, got = metrics(straight), metrics(interrupted)
    for step in range(stopped + 1, config.total_steps + 1):
        assert got[step]["loss"] == expected[step]["loss"], step  # bitwise on CPU float32
    (step_a, a), (step_b, b) = final_params(config, straight), final_params(config, interrupted)
    assert step_a == step_b == config.total_steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert expected[config.total_steps]["loss"] < expected[1]["loss"]
    # Samples seen per source survive the restart (kept in the checkpoint's progress item).
    assert got[config.total_steps]["seen_train"] == expected[config.total_steps]["seen_train"] == 6 * 8


def test_parameters_are_sharded_fsdp_style(record_set):
    """On 8 devices with fsdp=8, every large kernel is split and each device holds about 1/8."""
    config = run_config(record_set, data=1, fsdp=8)
    config.model.width, config.model.mlp_dim = 64, 128  # every width divisible by 8
    config.model.action.update(width=32, mlp_dim=64, num_heads=4)
    run = run_state.setup(config)
    params = run_state.initial_params(run, seed=0)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = [0] * 8
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
        if leaf.ndim >= 2 and leaf.size >= 4096:
            assert leaf.addressable_shards[0].data.size == leaf.size // 8, leaf.shape
    assert max(per_device) < 1.2 * total / 8
    assert summary.parameter_counts(config.model)["total"] * 4 == total


def launch(args, devices, program=("-m", "tools.train"), fast_compile=True, cwd=None, env=None):
    """`program` (default caip-train) in a new process with `devices` virtual CPU devices; with
    `fast_compile`, the tests' XLA flags (conftest.py), which a run that computes more than it
    compiles (the demo) goes without. tests/ and the repository on its path (for the config
    file's imports, and for `-m tools...` from another `cwd`); `env` replaces os.environ."""
    flags = [os.environ["CAIP_TEST_XLA_FLAGS"]] if fast_compile else []
    env = dict(
        os.environ if env is None else env,
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)),
                                    os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, *program, *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def finish(process, timeout: float = 300) -> None:
    """Waits for a launched process; its output's tail is the failure message."""
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]


def config_flags(config, workdir):
    """The config as caip-train flags: the tiny config file plus overrides."""
    flags = [f"--config={tiny_run_config.__file__}", f"--workdir={workdir}"]
    flags += [f"--config.data.train={config.data.train}", f"--config.data.tokenizer={config.data.tokenizer}"]
    return flags


@pytest.mark.slow
def test_two_processes_preempted_and_resumed_train_like_one(record_set, tmp_path):
    """2 processes x 2 CPU devices on 127.0.0.1 against 1 process x 4 devices, same global
    batch. Preemption reaches one of the two: JAX's preemption sync point picks one step for
    both, both save it and exit 75 (not 0); restarted, they finish with the one process's
    losses, and their checkpoint restores in a 1-process run."""
    config = run_config(record_set)
    config.total_steps = 24
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    steps = f"--config.total_steps={config.total_steps}"
    finish(launch(config_flags(config, one) + [steps], devices=4))

    port = 20000 + os.getpid() % 20000
    launch_both = lambda: [
        launch(config_flags(config, two) + [steps, f"--coordinator_address=127.0.0.1:{port}",
                                            "--num_processes=2", f"--process_id={i}"], devices=2)
        for i in range(2)
    ]
    processes = launch_both()
    wait_for(lambda: os.path.exists(os.path.join(two, "metrics.jsonl")) and len(metrics(two)) >= 2)
    processes[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [train.PREEMPTED_EXIT_CODE] * 2, outs[0][-2000:] + outs[1][-2000:]
    saved = [int(re.search(r"saved step (\d+)", out).group(1)) for out in outs]
    assert saved[0] == saved[1] < config.total_steps
    checkpoints = Checkpoints(two)
    assert checkpoints.latest_step() == saved[0] and set(checkpoints.items(saved[0])) >= {"params", "opt_state", "data"}
    checkpoints.close()
    for process in launch_both():
        finish(process)

    expected, got = metrics(one), metrics(two)  # later lines of a step win
    assert set(got) == set(expected)
    for step in expected:
        np.testing.assert_allclose(got[step]["loss"], expected[step]["loss"], rtol=2e-5, err_msg=str(step))
    # The 2-process checkpoint restores here, in one process on another mesh. Parameters agree
    # in bulk; elementwise, Adam turns float-rounding differences of near-zero gradients into
    # updates of size lr, so only the global relative difference is a fair measure.
    (step_a, a), (step_b, b) = final_params(config, one), final_params(config, two)
    assert step_a == step_b == config.total_steps
    flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
    assert np.linalg.norm(flat(a) - flat(b)) < 1e-4 * np.linalg.norm(flat(a))


def test_siglip2_import_and_init_siglip2_start_the_same_run(record_set, tmp_path):
    """caip-import-siglip2's step 0 holds the HF towers and caip-train continues from it; the
    config field init.siglip2 starts training from the very same parameters."""
    hf_config = tiny.hf_siglip_config()
    hf_config.text_config.vocab_size = 300  # as tiny_run_config's model
    hf = tiny.random_hf_siglip(hf_config, seed=3)
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(hf_dir)
    config = run_config(record_set)
    config.total_steps = 2

    imported = str(tmp_path / "imported")
    assert train.import_siglip2(config, hf_dir, imported) == 0
    step, params = final_params(config, imported)
    expected = siglip2.from_hf_state_dict(tiny.state_dict_numpy(hf), tiny.HEADS)
    flat = traverse_util.flatten_dict(params, sep="/")
    assert step == 0 and {k for k in flat if k.split("/")[0] in ("img", "txt", "t", "b")} == set(expected)
    # The loss scalars start where the SigLIP paper starts a new pairing, not at SigLIP 2's.
    expected.update(t=np.float32(config.model.t_init), b=np.float32(config.model.b_init))
    for name, value in expected.items():
        np.testing.assert_array_equal(flat[name], value, err_msg=name)
    train.train(config, imported)

    config.init.siglip2 = hf_dir
    direct = str(tmp_path / "direct")
    train.train(config, direct)
    for step in (1, 2):
        assert metrics(direct)[step]["loss"] == metrics(imported)[step]["loss"]
