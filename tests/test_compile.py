"""caip-compile: caip-train's step compiled for a TPU topology on this CPU host (libtpu), its
report checked against facts computed here, and the one-line errors of bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_run_config
from caip_jax import aot, sharding, train_step
from caip_jax.models import dummy_inputs, model_from_config
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "configs/demo.py"
TOPOLOGY = "v5e:2x2"  # 4 chips; the compiler lets a program use 15.75 GiB of each


def caip_compile(*flags, topology=TOPOLOGY):
    command = [sys.executable, "-m", "tools.compile", "--config", DEMO, "--topology", topology, *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    result = caip_compile("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        written = json.load(f)
    assert json.loads(result.stdout) == written
    return written


@pytest.mark.slow
def test_report_memory_holds_the_parameters_and_optimizer_state(report):
    config = demo.get_config()
    model = model_from_config(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config.model)))["params"]
    leaves = jax.tree.leaves(shapes)
    assert report["parameters"] == sum(int(np.prod(x.shape)) for x in leaves)
    param_bytes = sum(int(np.prod(x.shape)) * 4 for x in leaves)  # float32
    batch = train_step.abstract_batch(config, sharding.make_mesh(config.mesh, jax.devices()[:4]))
    batch_bytes = sum(x.size * x.dtype.itemsize for x in batch.values())
    memory = report["memory_per_device"]
    assert report["mesh"] == dict(data=1, fsdp=4, tensor=1)
    # Parameters, Adam's mu and nu (float32): at best split 4 ways, at worst all on each device.
    assert 3 * param_bytes / 4 <= memory["argument_bytes"] <= 3 * param_bytes + batch_bytes + 1024
    parts = ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes")
    assert memory["total_bytes"] == sum(memory[k] for k in parts)
    assert memory["hbm_bytes"] == 15.75 * 2**30
    assert memory["hbm_fraction"] == pytest.approx(memory["total_bytes"] / memory["hbm_bytes"])


@pytest.mark.slow
def test_report_flops_are_the_models(report):
    """XLA counts every matmul of the model and the elementwise work besides (about 7% here)."""
    model_per_device = report["model_flops_per_step"] / report["devices"]
    assert report["model_flops_per_step"] == report["model_flops_per_sample"] * report["batch_size"]
    assert model_per_device <= report["compiled_flops_per_device"] <= 1.15 * model_per_device
    assert report["estimated_step_seconds"] == pytest.approx(model_per_device / (0.5 * 197e12))  # v5e's data sheet
    assert report["estimated_samples_per_second"] == pytest.approx(32 / report["estimated_step_seconds"])


@pytest.mark.slow
def test_a_config_that_does_not_fit_names_what_to_change():
    result = caip_compile("--config.batch_size=4194304")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"caip-compile: {DEMO} (model.variant='mu/8', batch_size=4194304, ")
    for fix in ("model.remat_policy", "lower batch_size", "config.mesh"):
        assert fix in message
    assert "available HBM (15.75G)" in message  # the compiler's limit is the table's


@pytest.mark.slow
def test_cli_bad_topology_is_one_line():
    result = caip_compile(topology="v7x:2x2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"caip-compile: --topology='v7x:2x2' is not a topology: use {aot.TOPOLOGY_FORMS}"
    )


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v7x:2x2", r"--topology='v7x:2x2' is not a topology: use v4:AxBxC"),
        ("v5p:4x4", r"--topology='v5p:4x4' is not a topology"),
        ("v5e:3x3", r"--topology='v5e:3x3': libtpu refuses it \(.*chips_per_host_bounds.*\); use "),
    ],
)
def test_unknown_topology_is_named(topology, message):
    with pytest.raises(aot.ConfigError, match=message):
        aot.topology_devices(topology)


def test_gpu_without_one_is_named():
    with pytest.raises(aot.ConfigError, match=r"^--topology=gpu: JAX sees no GPU on this host"):
        aot.topology_devices("gpu")


def test_mesh_that_does_not_take_the_topology_is_named():
    config = tiny_run_config.get_config()
    config.mesh.update(data=3, fsdp=1)
    with pytest.raises(ValueError, match=r"^mesh=\{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices, found 4: set one axis of config.mesh to -1$"):
        aot.compile_step(config, aot.topology_devices(TOPOLOGY))


def test_batch_not_divisible_by_the_batch_axes_is_named():
    config = tiny_run_config.get_config()  # data=2, fsdp=-1: 2 x 2 over 4 chips
    config.batch_size = 10
    with pytest.raises(ValueError, match=r"^batch_size=10 is not divisible by the batch axes data x fsdp = 4 .*use e.g. batch_size=12$"):
        aot.compile_step(config, aot.topology_devices(TOPOLOGY))


@pytest.mark.slow
def test_accumulation_holds_less_than_the_plain_step_at_the_same_batch():
    """The step at batch k x b compiled for TPU with optim.accum_steps=k holds the activations of
    one micro-batch of b: its temporary memory is well below the plain step's at k x b, and near
    the plain step's at b plus what accumulation keeps of the whole batch (both embeddings; the
    rest: each micro-batch's input slice and the gradient sum). b is large enough that
    activations, not the compiler's fixed scratch (~19 MB here), make the temporary memory."""
    devices = aot.topology_devices(TOPOLOGY)
    config = tiny_run_config.get_config()  # data 2 x fsdp 2 over the 4 chips
    config.model.depth = config.model.action.depth = 1  # compile time: the blocks are alike
    k, b = 2, 2048

    def temp(batch, accum):
        config.batch_size, config.optim.accum_steps = batch, accum
        return aot.compile_step(config, devices)["memory_per_device"]

    plain_large, accumulated, plain_micro = temp(k * b, 1), temp(k * b, k), temp(b, 1)
    assert accumulated["temp_bytes"] < 0.5 * plain_large["temp_bytes"]  # measured: 161 MiB against 413
    assert accumulated["temp_bytes"] < 1.5 * plain_micro["temp_bytes"] + accumulated["embedding_bytes"]  # 141 + 0.25
