"""Training-step speed and the memory of the ring loss, measured in one run.

  python benchmarks/train_step.py [--variants tiny,B/16] [--batch 8] [--steps 3]

For each variant: step time, samples/s, the step's FLOPs from XLA's cost analysis of the
compiled step, and MFU against the device's data-sheet peak (accelerators) and against this
machine's own dense matmul FLOP/s measured in the same run (every device, CPUs included). Then
the per-device temporary memory XLA plans for the gradient of the ring (chunked) sigmoid loss
against the all-gathered dense one, for a global batch of 16k on 8 devices (virtual CPU devices
if no accelerator). Writes benchmarks/results/train_step_PLATFORM.json.
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Eight virtual devices if this is a CPU (no effect on accelerators): the loss comparison
    # needs a mesh of 8; the step timings use one device.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import importlib.util
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import results_io
from caip_jax import config as caip_config
from caip_jax import loss, optim, sharding, train_step
from caip_jax.metrics import peak_flops_per_device
from caip_jax.models import dummy_inputs, model_from_config

flags.DEFINE_list("variants", ["tiny", "B/16"], "Model sizes: 'tiny' (configs/demo.py's) or big_vision variants.")
flags.DEFINE_integer("batch", 8, "Batch size of the step benchmark (per device).")
flags.DEFINE_integer("steps", 3, "Timed steps per variant.")
flags.DEFINE_integer("loss_batch", 16384, "Global batch of the loss memory comparison.")
FLAGS = flags.FLAGS


def timed(fn, *args, repeats: int) -> float:
    """Seconds per call of `fn(*args)` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_flops(device: jax.Device) -> float:
    """This device's dense matmul FLOP/s (bfloat16 on accelerators, float32 on CPU)."""
    n = 2048 if device.platform == "cpu" else 8192
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timed(matmul, a, repeats=5)


def model_config(variant: str):
    if variant == "tiny":
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
        spec = importlib.util.spec_from_file_location("demo_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config().model
    config = caip_config.model_config(variant)
    config.dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return config


def step_figures(variant: str, device_flops: float) -> dict:
    config = model_config(variant)
    device = jax.devices()[0]
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), [device])
    model = model_from_config(config)
    tx, _ = optim.make_optimizer(optim.optim_config(), total_steps=1000)
    params, _ = sharding.sharded_init(lambda r: model.init(r, **dummy_inputs(config))["params"], jax.random.key(0), mesh)
    opt_state = jax.jit(tx.init)(params)
    b, t = FLAGS.batch, config.action.horizon
    batch = dict(  # what the host pipeline hands over (see data/pipeline.py's Preprocess)
        image=jnp.zeros((b, config.image_size, config.image_size, 3), jnp.uint8),
        jitter=jnp.ones((b, 3)),
        text=jnp.ones((b, config.text.length), jnp.int32),
        translation=jnp.zeros((b, t, 2, 21, 3), jnp.int16),
        translation_scale=jnp.ones((b, 1)),
        rotation=jnp.zeros((b, t, 2, 21, 3), jnp.int16),
        valid=jnp.ones((b, t + 1, 2), bool),
        source_index=jnp.zeros((b,), jnp.int32),
    )
    run_config = caip_config.base_config()
    run_config.model = config
    stats = jnp.zeros((1, 2, 21, 9)), jnp.ones((1, 2, 21, 9))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = jax.jit(train_step.make_train_step(model, tx, mesh, run_config, *stats), donate_argnums=(0, 1))
        compiled = step.lower(params, opt_state, batch).compile()
    flops = compiled.cost_analysis().get("flops", 0.0)
    state = [params, opt_state]

    def run():
        state[0], state[1], metrics = compiled(state[0], state[1], batch)
        return metrics

    seconds = timed(run, repeats=FLAGS.steps)
    peak = peak_flops_per_device(device)
    return dict(
        variant=variant,
        batch=FLAGS.batch,
        parameters=sum(x.size for x in jax.tree.leaves(params)),
        step_seconds=seconds,
        samples_per_second=FLAGS.batch / seconds,
        step_flops=flops,
        achieved_flops_per_second=flops / seconds,
        mfu_vs_measured_matmul=flops / seconds / device_flops,
        mfu_vs_datasheet_peak=flops / seconds / peak if peak else None,
    )


def loss_memory() -> dict:
    """Per-device temporary bytes XLA plans for d(loss)/d(embeddings), ring vs all-gather."""
    devices = jax.devices()[:8]
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1), devices)
    spec = NamedSharding(mesh, P(("data", "fsdp")))
    z = jax.ShapeDtypeStruct((FLAGS.loss_batch, 1024), jnp.float32, sharding=spec)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    ring = lambda x, y, t, b: loss.chunked_sigmoid_loss(x, y, t, b, mesh)[0]
    out = {}
    for name, fn in (("ring", ring), ("all_gathered", loss.sigmoid_loss)):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(z, z, scalar, scalar).compile()
        out[f"{name}_temp_bytes_per_device"] = compiled.memory_analysis().temp_size_in_bytes
    out["global_batch"], out["devices"] = FLAGS.loss_batch, len(devices)
    return out


def main(argv):
    del argv
    device = jax.devices()[0]
    device_flops = matmul_flops(device)
    result = dict(
        device=device.device_kind,
        platform=device.platform,
        machine=results_io.machine(),
        measured_matmul_flops_per_second=device_flops,
        steps=[step_figures(v, device_flops) for v in FLAGS.variants],
        loss_memory=loss_memory(),
    )
    results_io.write(f"train_step_{device.platform}", result)


if __name__ == "__main__":
    app.run(main)
