"""Ahead-of-time compilation of the training step for a TPU slice this host does not have
(libtpu compiles for any named topology on a CPU host), or for this host's GPUs.

The step is caip-train's own (`run_state`, `train_step.jit_train_step`), lowered from abstract
inputs only: no parameter, optimizer state or batch is ever allocated. What the compiler says of
it answers whether a config fits and what a step costs: memory per device against the HBM limit,
FLOPs per device, and a step time estimated at a given fraction of the chip's peak.

"""
import os
import re
import resource
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from caip_jax import flops, metrics, run_state, sharding, train_step
from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from caip_jax.models.caip import tower_size

TOPOLOGY_FORMS = "v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB (e.g. v5p:4x4x4, v4:4x4x4, v5e:16x16, v6e:8x8), or gpu"
_TOPOLOGY = re.compile(r"(v4|v5p):\d+x\d+x\d+|(v5e|v6e):\d+x\d+")
CHIP_CONFIGS = ("", "default", "megacore")
# XLA's words when a program does not fit (they differ between libtpu versions and passes).
_OUT_OF_MEMORY = re.compile(r"Ran out of memory (in memory space hbm|on HBM)", re.IGNORECASE)


class ConfigError(ValueError):
    """A config or topology that cannot be compiled; the message names the field and the fix."""


def topology_devices(topology: str, num_slices: int = 1, chip_config: str = "") -> list[jax.Device]:
    """The devices of `num_slices` slices of the TPU `topology` ('v5p:4x4x4': 64 chips), as
    compile-only devices; or, for 'gpu', this host's GPUs. `chip_config` 'megacore' makes each
    v4 chip one device (its two TensorCores together), as v5p chips are by default."""
    if topology == "gpu":
        try:
            return jax.devices("gpu")
        except RuntimeError:  # JAX's "Unknown backend" when it sees no GPU
            raise ConfigError("--topology=gpu: JAX sees no GPU on this host; name a TPU topology instead") from None
    if not _TOPOLOGY.fullmatch(topology):
        raise ConfigError(f"--topology={topology!r} is not a topology: use {TOPOLOGY_FORMS}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be at least 1")
    if chip_config not in CHIP_CONFIGS:
        raise ConfigError(f"--chip_config={chip_config!r} is not one of {CHIP_CONFIGS[1:]} (or empty)")
    # Compile-only devices use no chip, so the lock libtpu takes against a second process on the
    # same TPUs (another compile, a pytest worker) is not needed; nor are metadata-server lookups.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    options = dict(num_slices=num_slices)
    if chip_config:
        options["chip_config_name"] = chip_config
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **options).devices)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"--topology={topology!r}: libtpu refuses it ({reason}); use {TOPOLOGY_FORMS}") from None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fix_hint(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: str) -> str:
    return (
        f"{source} (model.variant={config.model.variant!r}, batch_size={config.batch_size}, "
        f"model.remat_policy={config.model.remat_policy!r}, config.mesh={dict(mesh.shape)}) does not fit: "
        "set model.remat_policy to one that keeps less ('dots_no_batch', then 'full'), set optim.accum_steps "
        f"(now {config.optim.accum_steps}: the same gradient in micro-batches, one more forward), lower batch_size, "
        "or spread the batch over more devices (config.mesh, a larger --topology)"
    )


def compile_step(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    source: str = "the config",
    mfu: float = 0.5,
) -> dict:
    """Lowers and compiles caip-train's step of `config` over a mesh of `devices` and reports:

    parameters; per-device argument, output (less what aliases donated arguments), temporary
    and generated-code bytes, their sum and its fraction of the device's HBM limit; FLOPs per
    device as compiled (rematerialisation included; XLA counts a scan body once, so with
    model.scan one block per tower) and model FLOPs per step and per sample (`caip_jax.flops`);
    the step time and samples/s if the chip ran the model's, rematerialisation's
    (`flops.remat_flops_per_sample`) and accumulation's (one more forward of the towers) matmuls at
    `mfu` of its peak, and the MFU that makes; lowering and
    compile seconds; this process's peak host memory. `source` (the config file) names the
    config in the error raised when it does not fit.
    """
    # The mesh refuses a shape the devices cannot take, and the batch one the mesh cannot split.
    run = run_state.setup(config, devices)
    opt = run_state.optimizer(config, run)
    params = run_state.abstract_params(run)
    batch = train_step.abstract_batch(config, run.mesh)
    # The action statistics are constants of the step; their values do not change the program.
    stats_shape = (1, NUM_HANDS, NUM_KEYPOINTS, FEATURES_PER_KEYPOINT)
    mean, std = np.zeros(stats_shape, np.float32), np.ones(stats_shape, np.float32)

    start = time.perf_counter()
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        lowered = train_step.jit_train_step(run, opt, config, mean, std).lower(params, opt.abstract_state, batch)
    lowered_at, cpu_before = time.perf_counter(), _cpu_seconds()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if not _OUT_OF_MEMORY.search(str(error)):
            raise
        raise ConfigError(f"{_fix_hint(config, run.mesh, source)}; the compiler: {str(error).splitlines()[0]}") from None
    compiled_at, cpu_after = time.perf_counter(), _cpu_seconds()

    device, batch_ways = devices[0], train_step.batch_ways(run.mesh)
    hbm = metrics.hbm_bytes_per_device(device)
    memory = compiled.memory_analysis()
    per_device = dict(
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        generated_code_bytes=memory.generated_code_size_in_bytes,
    )
    total = sum(per_device.values())
    if hbm and total > hbm:
        raise ConfigError(f"{_fix_hint(config, run.mesh, source)}; it needs {total / 2**30:.2f} GiB of {hbm / 2**30:.2f} GiB HBM per device")

    num_devices = run.mesh.size
    model_per_sample = flops.train_flops_per_sample(config.model, config.batch_size)
    remat_per_sample = flops.remat_flops_per_sample(config.model)
    accum = config.optim.accum_steps
    # Accumulation runs every micro-batch's forward twice (once for the embeddings, once under
    # the vjp): the towers' forward once more, not the loss.
    forward = flops.forward_flops_per_sample(config.model, config.batch_size)
    accum_per_sample = sum(forward[k] for k in ("image", "text", "pool", "action")) if accum > 1 else 0
    model_per_device = model_per_sample * config.batch_size / num_devices
    executed_per_device = (model_per_sample + remat_per_sample + accum_per_sample) * config.batch_size / num_devices
    peak = metrics.peak_flops_per_device(device)
    step_seconds = executed_per_device / (mfu * peak) if peak else None
    return dict(
        device_kind=device.device_kind,
        devices=num_devices,
        mesh=dict(run.mesh.shape),
        batch_size=config.batch_size,
        accum_steps=accum,
        micro_batch_size=config.batch_size // accum,
        remat_policy=config.model.remat_policy,
        scan=config.model.scan,
        loss=config.loss,
        parameters=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
        memory_per_device=dict(per_device, total_bytes=total, hbm_bytes=hbm, hbm_fraction=total / hbm if hbm else None,
                               # what accumulation keeps of the whole batch: both embeddings, float32
                               embedding_bytes=2 * config.batch_size // batch_ways * tower_size(config.model)["width"] * 4),
        compiled_flops_per_device=(compiled.cost_analysis() or {}).get("flops"),
        model_flops_per_sample=model_per_sample,
        model_flops_per_step=model_per_sample * config.batch_size,
        remat_flops_per_sample=remat_per_sample,
        accum_flops_per_sample=accum_per_sample,
        peak_flops_per_device=peak,
        assumed_hardware_utilisation=mfu,
        estimated_step_seconds=step_seconds,
        estimated_samples_per_second=config.batch_size / step_seconds if step_seconds else None,
        estimated_mfu=mfu * model_per_device / executed_per_device,
        lowering_seconds=lowered_at - start,
        compile_seconds=compiled_at - lowered_at,
        compile_cpu_seconds=cpu_after - cpu_before,  # all threads: what the time is on a busy host
        host_peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
