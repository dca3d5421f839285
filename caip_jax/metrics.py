"""Training metrics to the console (progress bar), TensorBoard and WORKDIR/metrics.jsonl, from
process 0 only; and the devices' peak FLOP/s for MFU."""
import json
import math
import os

import jax
import tqdm
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets. Devices not listed (CPUs)
# get no MFU; benchmarks/train_step.py measures their matmul peak instead.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device) -> float | None:
    """The longest PEAK_FLOPS name that `device.device_kind` starts with, or None."""
    names = [name for name in PEAK_FLOPS if device.device_kind.startswith(name)]
    return PEAK_FLOPS[max(names, key=len)] if names else None


def finite_or_none(metrics: dict) -> dict:
    """NaN and infinities as null: metrics.jsonl stays JSON (json.dumps would write bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class MetricsLog:
    """Writes one dict of scalars per logged step; does nothing on processes other than 0."""

    def __init__(self, workdir: str, total_steps: int, start: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        self._jsonl.write(json.dumps(finite_or_none(metrics), allow_nan=False) + "\n")
        self._jsonl.flush()
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
