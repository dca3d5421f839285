"""Pod plans, and the compile of scanned against unscanned layers, by caip-compile (the step
compiled ahead of time for TPU topologies by libtpu on this CPU host).

  python benchmarks/compile.py [--parts scan,plans,accum] [--max_hbm_fraction 0.8]

`scan`: L/16 at batch 16384 on v5p-128 (v5p:4x4x4) with `--scan_remat`, compiled unscanned,
scanned, and at depth 2 both ways (what scanning cannot remove: one block's code per tower and
everything outside the blocks; unscanned at depth 2 it is the same program, unrolled) in this
run: compile time, libtpu's stage times and program size in bundles, host memory, FLOPs and
memory per device. The unscanned compile takes 5-17 minutes
and 12-15 GB of host memory: it starts only with more than 16 GiB available. Figures once in
the JSON are reused unless `--fresh`.

`plans` (v5p-128 = v5p:4x4x4, v5p-512 = v5p:4x8x8: 256 chips of two TensorCores, v5e-256 and
v6e-256 = 16x16): for each config, global batch and topology, the fastest plan that fits: remat policies
in the order of their estimated step time (none = dots < dots_no_batch < full: matmul FLOPs
recomputed, `caip_jax.flops.remat_flops_per_sample`), the first whose step needs at most
`--max_hbm_fraction` of HBM (the rest is headroom for what the compiler does not see: batches
in flight, checkpoint copies, fragmentation, a longer text). The estimate (the model's and the
recomputed matmuls at 50% of the chip's peak) ignores communication, so it cannot rank meshes:
the mesh is fsdp over every chip (the least memory per device), or data x fsdp with the
smallest data that the parameter widths divide. A policy that did not fit for a model on a
chip at some batch per device is not tried at a larger one.

`accum` (L/16 and So400m/16 at batch 32768 on v5p-128, v5e-256, v6e-256): the fastest plan
that uses gradient accumulation (`optim.accum_steps=k`, the exact large-batch gradient in k
micro-batches, one more forward of the towers per step) against the best remat-only plan of
`plans`, by the same estimate and the same HBM bound. Candidates go by estimated step time
(dots < dots_no_batch < full, each plus the extra forward) and, at equal time, from k = 4 to 8
(k does not change the estimate, and more micro-batches hold less): the first that fits is the
fastest accumulation plan by the estimate. The estimate ignores what smaller matmuls lose.

Every compile is its own caip-compile process (its host memory is its own); each result is
written to benchmarks/results/compile.json as soon as it is known and reused by a later run.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

from absl import app, flags

import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ("none", "dots", "dots_no_batch", "full")  # by estimated step time

flags.DEFINE_list("parts", ["scan", "plans", "accum"], "What to measure: scan, plans, accum.")
flags.DEFINE_list("accum_topologies", ["v5p:4x4x4", "v5e:16x16", "v6e:16x16"], "Topologies of the accumulation plans.")
flags.DEFINE_integer("accum_batch", 32768, "Global batch of the accumulation plans.")
flags.DEFINE_float("min_available_gib", 14.0, "Host memory a compile waits for (an L/16 compile takes 12-15 GB).")
flags.DEFINE_list("configs", ["configs/caip_vitl16_256.py", "configs/caip_so400m16_256.py"], "Configs to plan.")
flags.DEFINE_list("batches", ["16384", "32768"], "Global batch sizes.")
flags.DEFINE_list("topologies", ["v5p:4x4x4", "v5p:4x8x8", "v5e:16x16", "v6e:16x16"], "TPU topologies (v5p-128, v5p-512, v5e-256, v6e-256).")
flags.DEFINE_float("max_hbm_fraction", 0.8, "A plan fits if its step needs at most this fraction of HBM.")
flags.DEFINE_string("scan_remat", "dots_no_batch", "Remat policy of the scanned-vs-unscanned comparison.")
flags.DEFINE_integer("timeout", 3600, "Seconds one compile may take.")
flags.DEFINE_bool("fresh", False, "Compile the scan comparison again (on an idle host), not reusing the JSON.")
flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "compile.json"), "The results (and cache).")
FLAGS = flags.FLAGS


def chips(topology: str) -> int:
    return math.prod(int(n) for n in topology.split(":")[1].split("x"))


def load() -> dict:
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            return json.load(f)
    return dict(compiles={})


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


# libtpu's own log lines (at TPU_MIN_LOG_LEVEL=0): the time of each compiler stage, program size.
STAGE = re.compile(r"\] (HLO_PASSES|BACKEND_PASSES|CODE_GENERATION|END_TO_END) stage duration: (?:(\d+)m)?([\d.]+)(m?s)")
BUNDLES = re.compile(r"final program bundle count: ([\d,]+)")


def compiler_log(stderr: str) -> dict:
    """{stage: seconds}, and the program's bundles (TPU instruction words), from libtpu's log."""
    stages = {name.lower(): int(minutes or 0) * 60 + float(value) / (1000 if unit == "ms" else 1)
              for name, minutes, value, unit in STAGE.findall(stderr)}
    bundles = BUNDLES.search(stderr)
    return dict(stage_seconds=stages, bundles=int(bundles.group(1).replace(",", "")) if bundles else None)


def caip_compile(results: dict, config: str, topology: str, fresh: bool = False, **overrides) -> dict:
    """caip-compile's report (`fits`: True) with libtpu's `compiler_log`, or {fits: False, error}
    if the config does not fit or the mesh does not divide the model; from the results if
    compiled before, unless `fresh`."""
    key = " ".join([config, topology, *[f"{k}={v}" for k, v in sorted(overrides.items())]])
    if key in results["compiles"] and not fresh:
        return results["compiles"][key]
    while available_gib() < FLAGS.min_available_gib:  # other work on the host: wait, do not swap or die
        print(f"waiting for {FLAGS.min_available_gib} GiB of host memory ({available_gib():.1f} available)", flush=True)
        time.sleep(30)
    out = FLAGS.out + ".tmp"
    command = [sys.executable, "-m", "tools.compile", "--config", config, "--topology", topology, "--out", out]
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    print("compiling", key, flush=True)
    start = time.perf_counter()
    env = dict(os.environ, TPU_STDERR_LOG_LEVEL="0", TPU_MIN_LOG_LEVEL="0")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=FLAGS.timeout, env=env)
    if done.returncode == 0:
        with open(out) as f:
            result = dict(json.load(f), fits=True, **compiler_log(done.stderr))
        os.remove(out)
    else:
        said = [line for line in done.stderr.splitlines() if line.startswith("caip-compile: ")]
        if not said:  # not a config that does not fit: a failure
            raise RuntimeError(f"{key}: {done.stderr[-3000:]}")
        result = dict(fits=False, error=said[-1])
    result.update(wall_seconds=time.perf_counter() - start, load_average=os.getloadavg()[0])
    results["compiles"][key] = result
    save(results)
    print(json.dumps(result), flush=True)
    return result


def save(results: dict) -> None:
    results["machine"] = results_io.machine()
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)


def fits(result: dict) -> bool:
    return result["fits"] and result["memory_per_device"]["hbm_fraction"] <= FLAGS.max_hbm_fraction


def scan_comparison(results: dict) -> dict:
    config, topology = "configs/caip_vitl16_256.py", "v5p:4x4x4"
    common = {"batch_size": 16384, "model.remat_policy": FLAGS.scan_remat, "mesh.data": 1, "mesh.fsdp": -1}
    if available_gib() <= 16:
        print(f"skipping the scan comparison: {available_gib():.1f} GiB available, the unscanned compile needs 12-15", flush=True)
        return results.get("scan_vs_unscanned", {})
    compiles = {
        name: caip_compile(results, config, topology, fresh=FLAGS.fresh, **common, **overrides)
        for name, overrides in (("scanned", {"model.scan": True}), ("scanned_depth_2", {"model.scan": True, "model.depth": 2}),
                                ("unscanned", {"model.scan": False}), ("unscanned_depth_2", {"model.scan": False, "model.depth": 2}))
    }
    keys = ("compile_seconds", "compile_cpu_seconds", "lowering_seconds", "stage_seconds", "bundles",
            "host_peak_memory_bytes", "compiled_flops_per_device", "estimated_step_seconds", "load_average")
    scanned, unscanned = compiles["scanned"], compiles["unscanned"]
    return {name: {k: r.get(k) for k in keys} | dict(memory_per_device=r.get("memory_per_device"))
            for name, r in compiles.items()} | dict(
        compile_speedup=unscanned["compile_seconds"] / scanned["compile_seconds"],
        compile_cpu_speedup=unscanned["compile_cpu_seconds"] / scanned["compile_cpu_seconds"],
    )


def meshes() -> list[dict]:
    """fsdp over every chip, then data x fsdp with data 2, 4 (for widths fsdp does not divide)."""
    return [{"mesh.data": data, "mesh.fsdp": -1} for data in (1, 2, 4)]


def plan(results: dict, config: str, batch: int, topology: str, failed: set) -> dict:
    """The first policy (and mesh) that fits, by estimated step time; `failed` holds
    (config, chip, policy, batch per chip) that did not fit, for skipping larger batches."""
    chip, per_chip = topology.split(":")[0], batch // chips(topology)
    tried = []
    for policy in POLICIES:
        if any(c == config and k == chip and p == policy and b <= per_chip for c, k, p, b in failed):
            tried.append(dict(remat_policy=policy, skipped="did not fit at a smaller batch per chip"))
            continue
        for mesh in meshes():
            overrides = {"batch_size": batch, "model.scan": True, "model.remat_policy": policy, **mesh}
            result = caip_compile(results, config, topology, **overrides)
            if result["fits"] or "does not fit" in result["error"]:
                break  # a mesh that divides the model: the others only add memory
        tried.append(dict(remat_policy=policy, mesh=mesh, fits=fits(result),
                          hbm_fraction=result.get("memory_per_device", {}).get("hbm_fraction")))
        if fits(result):
            return dict(config=config, batch_size=batch, topology=topology, remat_policy=policy,
                        mesh=result["mesh"], tried=tried, **summary(result))
        failed.add((config, chip, policy, per_chip))
    return dict(config=config, batch_size=batch, topology=topology, remat_policy=None, tried=tried)


ACCUM_CANDIDATES = [(policy, k) for policy in ("dots", "dots_no_batch", "full") for k in (4, 8)]


def accum_plan(results: dict, config: str, batch: int, topology: str) -> dict:
    """The first accumulation candidate that fits (see the module docstring), on the mesh of the
    remat-only plan of the same cell, next to that plan."""
    remat_only = next((p for p in results.get("plans", []) if (p["config"], p["batch_size"], p["topology"]) == (config, batch, topology)), None)
    mesh = remat_only["mesh"] if remat_only and remat_only.get("mesh") else {"data": 1, "fsdp": -1}
    tried = []
    for policy, k in ACCUM_CANDIDATES:
        overrides = {"batch_size": batch, "model.scan": True, "model.remat_policy": policy, "optim.accum_steps": k,
                     "mesh.data": mesh["data"], "mesh.fsdp": -1}
        result = caip_compile(results, config, topology, **overrides)
        tried.append(dict(remat_policy=policy, accum_steps=k, fits=fits(result),
                          hbm_fraction=result.get("memory_per_device", {}).get("hbm_fraction")))
        if fits(result):
            best = dict(remat_policy=policy, accum_steps=k, mesh=result["mesh"], **summary(result),
                        temp_bytes=result["memory_per_device"]["temp_bytes"],
                        embedding_bytes=result["memory_per_device"]["embedding_bytes"])
            break
    else:
        best = None
    remat_keys = ("remat_policy", "estimated_step_seconds", "hbm_fraction", "mesh")
    winner = None
    if best and remat_only and remat_only.get("remat_policy"):
        winner = "accumulation" if best["estimated_step_seconds"] < remat_only["estimated_step_seconds"] else "remat only"
    return dict(config=config, batch_size=batch, topology=topology, accumulation=best, tried=tried, winner=winner,
                remat_only={k: remat_only.get(k) for k in remat_keys} if remat_only else None)


def summary(result: dict) -> dict:
    keys = ("estimated_step_seconds", "estimated_samples_per_second", "estimated_mfu", "compile_seconds",
            "compile_cpu_seconds", "host_peak_memory_bytes", "parameters", "model_flops_per_sample")
    return {k: result[k] for k in keys} | dict(hbm_fraction=result["memory_per_device"]["hbm_fraction"])


def main(argv):
    del argv
    os.environ["JAX_PLATFORMS"] = "cpu"
    results = load()
    results["max_hbm_fraction"] = FLAGS.max_hbm_fraction
    if "scan" in FLAGS.parts:
        results["scan_vs_unscanned"] = scan_comparison(results)
        save(results)
    if "plans" in FLAGS.parts:
        failed = set()
        cells = [(c, int(b), t) for c in FLAGS.configs for t in FLAGS.topologies for b in FLAGS.batches]
        cells.sort(key=lambda cell: cell[1] // chips(cell[2]))  # smaller batches per chip first
        results["plans"] = [plan(results, *cell, failed) for cell in cells]
        save(results)
    if "accum" in FLAGS.parts:
        results.setdefault("accum_plans", [])
        for config in FLAGS.configs:
            for topology in FLAGS.accum_topologies:
                cell = accum_plan(results, config, FLAGS.accum_batch, topology)
                results["accum_plans"] = [p for p in results["accum_plans"]
                                          if (p["config"], p["topology"], p["batch_size"]) != (config, topology, FLAGS.accum_batch)] + [cell]
                save(results)
    print(json.dumps({k: v for k, v in results.items() if k != "compiles"}, indent=1))


if __name__ == "__main__":
    app.run(main)
