"""How far the host runs ahead of the devices with each way of checking for preemption.

2 processes x 2 CPU devices on 127.0.0.1 run N steps of a jitted, sharded step (row-local matmuls) and check for preemption after every step, either as caip-train did before
(`process_allgather` of a flag: a collective that waits for the step before it) or as it does
now (`multihost_utils.reached_preemption_sync_point`: the coordination service, no device work).
Figures per check: host seconds to dispatch all N steps, wall seconds until the last result is
ready, and the steps still in flight when the host finished dispatching.

  python benchmarks/dispatch.py [--steps 40]
"""
import argparse
import os
import subprocess
import sys
import time

CHECKS = ("allgather", "sync_point")


def worker(process_id: int, port: int, steps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("batch"))

    w = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024), np.float32) / 32)

    @jax.jit
    def step(x):  # rows stay on their device: the only collective is the check's
        for _ in range(8):
            x = jnp.tanh(x @ w)
        return x

    local = np.random.default_rng(process_id).standard_normal((1024, 1024), np.float32)
    x = jax.make_array_from_process_local_data(sharding, local)
    step(x).block_until_ready()  # compile
    for check in CHECKS:
        y = step(x).block_until_ready()
        start = time.perf_counter()
        for number in range(1, steps + 1):
            y = step(y)
            if check == "allgather":
                multihost_utils.process_allgather(np.int32(0)).any()
            else:
                multihost_utils.reached_preemption_sync_point(number)
        dispatched = time.perf_counter() - start
        y.block_until_ready()
        wall = time.perf_counter() - start
        if process_id == 0:
            per_step = wall / steps
            print(f"RESULT {check} {dispatched:.4f} {wall:.4f} {(wall - dispatched) / per_step:.2f}", flush=True)
    jax.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worker", type=int, default=None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.port, args.steps)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import results_io

    port = 21000 + os.getpid() % 20000
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    command = [sys.executable, __file__, f"--steps={args.steps}", f"--port={port}"]
    workers = [subprocess.Popen([*command, f"--worker={i}"], env=env, stdout=subprocess.PIPE, text=True) for i in range(2)]
    out = [w.communicate(timeout=600)[0] for w in workers]
    if any(w.returncode for w in workers):
        sys.exit("a worker failed")
    figures = {}
    for line in out[0].splitlines():
        if line.startswith("RESULT "):
            _, check, dispatched, wall, in_flight = line.split()
            figures[check] = dict(host_dispatch_s=float(dispatched), wall_s=float(wall), steps_in_flight_at_end=float(in_flight))
    results_io.write("dispatch", dict(machine=results_io.machine(), steps=args.steps, processes=2, devices_per_process=2, checks=figures))


if __name__ == "__main__":
    main()
