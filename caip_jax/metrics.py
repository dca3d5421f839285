"""Training metrics to the console (progress bar), TensorBoard and WORKDIR/metrics.jsonl (local or
object storage), from process 0 only; and the devices' peak FLOP/s (for MFU) and memory."""
import json
import math
import sys
from typing import NamedTuple

import jax
import tqdm

from caip_jax import storage


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed (as it is here, for the export) only to accept torch tensors, and that import
    is ~2 s of every training process's start. Scalars never need it."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter

GiB = 2**30


class Chip(NamedTuple):
    peak_flops: float  # dense bf16 FLOP/s, from the vendor's data sheet
    hbm_bytes: float | None  # what the XLA compiler lets one program use (TPU), a little under the data sheet's
    cores: int = 1  # TensorCores per chip


# By device kind. A device is a whole chip, except on v4 without chip_config megacore (one
# TensorCore: half of each). Devices not listed (CPUs) get no MFU; benchmarks/train_step.py
# measures their matmul peak instead. GPUs report their memory limit themselves.
CHIPS = {
    "TPU v4": Chip(275e12, 30.75 * GiB, cores=2),
    "TPU v5 lite": Chip(197e12, 15.75 * GiB),
    "TPU v5e": Chip(197e12, 15.75 * GiB),
    "TPU v5": Chip(459e12, 95.74 * GiB, cores=2),
    "TPU v5p": Chip(459e12, 95.74 * GiB, cores=2),
    "TPU v6 lite": Chip(918e12, 31.25 * GiB),
    "TPU v6e": Chip(918e12, 31.25 * GiB),
    "NVIDIA H100": Chip(989e12, None),
    "NVIDIA H200": Chip(989e12, None),
    "NVIDIA A100": Chip(312e12, None),
}


def _chip_share(device: jax.Device) -> tuple[Chip, float] | None:
    """The longest CHIPS name that `device.device_kind` starts with, and the share of the chip
    that the device is; None if not listed."""
    names = [name for name in CHIPS if device.device_kind.startswith(name)]
    if not names:
        return None
    chip = CHIPS[max(names, key=len)]
    return chip, getattr(device, "num_cores", chip.cores) / chip.cores


def peak_flops_per_device(device: jax.Device) -> float | None:
    """The device's dense bf16 peak FLOP/s; None for devices not listed."""
    found = _chip_share(device)
    return found[0].peak_flops * found[1] if found else None


def hbm_bytes_per_device(device: jax.Device) -> float | None:
    """The memory one program may use on `device`: the device's own limit where it reports one
    (GPUs), else the table's (TPUs, also compile-only ones)."""
    try:
        stats = device.memory_stats() or {}  # None on CPUs
    except jax.errors.JaxRuntimeError:  # compile-only devices (a topology's) have none
        stats = {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    found = _chip_share(device)
    return found[0].hbm_bytes * found[1] if found and found[0].hbm_bytes else None


def finite_or_none(metrics: dict) -> dict:
    """NaN and infinities as null: metrics.jsonl stays JSON (json.dumps would write bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class MetricsLog:
    """Writes one dict of scalars per logged step; does nothing on processes other than 0."""

    def __init__(self, workdir: str, total_steps: int, start: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._jsonl = storage.GrowingFile(storage.join(workdir, "metrics.jsonl"))
        self._tensorboard = _summary_writer_class()(storage.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        self._jsonl.write_line(json.dumps(finite_or_none(metrics), allow_nan=False))
        for name, value in metrics.items():
            if name != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", top1=f"{metrics['top1']:.3f}")
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        self._bar.write(f"step {step}: {shown}")

    def advance(self) -> None:
        if self.enabled:
            self._bar.update()

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._jsonl.close()
            self._tensorboard.close()
