"""What a user sees on the console: no libtpu start-up noise on a host without a TPU, and a
failed run ends with one line naming the cause and the fix (exit 1), no traceback unless asked."""
import os
import re
import subprocess
import sys

import pytest

from test_train import config_flags, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What libtpu prints when JAX probes it on a host without a TPU.
LIBTPU_NOISE = ("libtpu", "TPU_WORKER_HOSTNAMES", "InitGoogle", "host bounds for accelerator", "TPU_ACCELERATOR_TYPE")


def tool(module: str, *args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m tools.MODULE ARGS` from the repository root, as a user starts it: JAX_PLATFORMS
    unset, one CPU device with the tests' fast-compile flags (conftest.py), tests/ on the path
    for the tiny config's imports."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = os.environ["CAIP_TEST_XLA_FLAGS"]
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", f"tools.{module}", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_a_tool_starts_jax_without_libtpu_noise():
    """caip-model-info --forward initialises JAX's backend (one forward pass) with libtpu
    installed (the test extra) and no TPU here: nothing of libtpu's probe may show."""
    result = tool("model_info", "--config", "configs/demo.py", "--forward", "--batch", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "total" in result.stdout
    noise = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in LIBTPU_NOISE)]
    assert not noise, noise


def messages(stderr: str) -> list[str]:
    """stderr's lines without the progress bar (tqdm's, redrawn in place on a terminal)."""
    parts = [p.strip() for line in stderr.splitlines() for p in line.split("\r")]
    return [p for p in parts if p and not PROGRESS_BAR.search(p)]


PROGRESS_BAR = re.compile(r"^\d+%\|.*\| \d+/\d+ \[|^[.\s]*\?step/s|step/s, loss=")


@pytest.mark.slow
def test_a_non_finite_run_ends_with_one_line_on_stderr(record_set, tmp_path):
    """caip-train with a learning rate of 1e30: besides the progress bar, stderr is the one line
    naming the step and the fix (exit 1). A config error alike, and with --traceback the
    traceback is shown too."""
    config = run_config(record_set)
    args = [*config_flags(config, tmp_path / "run"), "--config.mesh.data=1", "--config.total_steps=4"]
    result = tool("train", *args, "--config.optim.learning_rate=1e30", "--config.optim.grad_clip_norm=0",
                  "--config.optim.weight_decay=0")
    assert result.returncode == 1
    lines = messages(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("caip-train: step ") and "Lower optim.learning_rate or set config.nonfinite.policy='skip'" in lines[0]
    for extra, shown in (([], False), (["--traceback"], True)):
        wrong = tool("train", *args, "--config.optim.accum_steps=3", *extra)  # batch_size 8
        assert wrong.returncode == 1 and ("Traceback (most recent call last)" in wrong.stderr) == shown
        assert messages(wrong.stderr)[-1].endswith("optim.accum_steps=3 does not divide batch_size=8 (the global batch): "
                                                   "use e.g. optim.accum_steps=2, or batch_size=9")
        assert shown or messages(wrong.stderr) == ["caip-train: " + messages(wrong.stderr)[-1].removeprefix("caip-train: ")]


def test_a_baseline_without_a_tokenizer_names_the_flag_to_set(tmp_path):
    result = tool("policy_eval", "--encoder", "random", "--caip_config", "configs/demo.py", "--out", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caip-policy-eval: --encoder random builds CAIP from --caip_config")
    assert "--caip_config.data.tokenizer=PATH" in lines[0]
