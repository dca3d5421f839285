"""Time and peak memory of the PyTorch export of an L/16-sized random checkpoint, and of loading
the export in PyTorch, measured in one run.

  python benchmarks/export.py [--config configs/caip_vitl16_256.py] [--dtypes float32,bfloat16]

Every figure comes from a fresh process, so that one measurement's memory never counts in
another's: a random checkpoint of the config's model is written first (random float32
leaves of `abstract_params`' shapes, no `model.init`), then `caip_jax.export.hf_dir.export`
runs once per dtype, then `AutoModel.from_pretrained` loads the float32 export and reads every
weight once. Peak memory is the process's peak resident set (`ru_maxrss` from os.wait4, that
child alone). The reference points, from the same run: the float32 size of the parameters,
the size of model.safetensors, and the peak of a process that only imports what the export
imports and exits, so that "peak - import baseline" is what the export itself held.

The export processes also sample their own resident set every 20 ms, noting which chunk is
being read or which tensor written, and record it on either side of the read of the largest
tensor, to say what sets the peak. --diagnose adds a float32 export with glibc made to return
freed buffers to the system at once, which separates the heap glibc keeps from what the export
holds. The checkpoint is read back from the page cache (it was just written). Everything
written is deleted at the end; writes benchmarks/results/export_cpu.json.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

import results_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("config", os.path.join(REPO, "configs", "caip_vitl16_256.py"), "Run config file of the model.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Export dtypes to measure.")
flags.DEFINE_bool("diagnose", True, "Also export float32 with glibc returning freed buffers at once (see main).")
flags.DEFINE_string("work", None, "Scratch directory (default: a new temporary one, deleted at the end).")
flags.DEFINE_enum("child", None, ["make", "imports", "export", "load"], "Internal: the measurement this process runs.")
flags.DEFINE_string("dtype", "float32", "Internal: the export dtype of --child=export.")
flags.DEFINE_string("largest", "", "Internal: the flat name of the largest parameter, for --child=export.")
FLAGS = flags.FLAGS
GB = 1e9
RESULT = "RESULT "  # prefix of the one stdout line a child reports on


def vm_kib(field: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status in KiB (VmRSS: resident now, VmHWM: peak resident); 0 once gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


# --- Children: each runs in a fresh process and prints one RESULT line. ---------------------

def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def child_make(work: str) -> dict:
    """A random float32 checkpoint (step 0, params and config) of the config's model."""
    import jax
    import numpy as np

    from caip_jax.checkpoint import Checkpoints
    from caip_jax.data.tokenizer import train_sentencepiece
    from caip_jax.models.summary import abstract_params

    start = time.perf_counter()
    config = load_config(FLAGS.config)
    texts = [f"pick up the {c} {s}" for c in ("red", "green", "blue") for s in ("cup", "box", "ball")]
    config.data.tokenizer = train_sentencepiece(texts * 20, os.path.join(work, "spm"), 300)
    rng = np.random.default_rng(0)
    # Scaled so that nothing overflows in the load test; values do not matter to the export.
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * np.float32(0.02), abstract_params(config.model))
    leaves = jax.tree.leaves(params)
    checkpoints = Checkpoints(os.path.join(work, "run"), asynchronous=False)
    checkpoints.save(0, params, config=config)
    checkpoints.close()
    largest = max(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: kv[1].nbytes)
    stored = os.path.join(checkpoints.directory, "0", "params")
    stored_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(stored) for f in files)
    return dict(parameters=sum(x.size for x in leaves), tensors=len(leaves), float32_bytes=sum(x.nbytes for x in leaves),
                checkpoint_params_bytes=stored_bytes,
                largest_tensor=dict(name="/".join(k.key for k in largest[0]), shape=list(largest[1].shape), bytes=largest[1].nbytes),
                seconds=time.perf_counter() - start)


def export_imports():
    import jax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import transformers  # noqa: F401

    from caip_jax.export import hf_dir

    return hf_dir


def child_imports(work: str) -> dict:
    del work
    export_imports()
    return dict(rss_kib=vm_kib("VmRSS"))


def child_export(work: str) -> dict:
    """One export, with a sampler thread that notes the resident set and what the export is
    doing (reading a chunk, named by its first tensor, or converting and writing a tensor);
    and the resident set on either side of the read of the chunk that holds the largest tensor."""
    hf_dir = export_imports()
    from caip_jax.checkpoint import Checkpoints
    from caip_jax import torch_names as names

    doing, peak, around, done = ["start"], [0, None], {}, threading.Event()
    read_params, to_torch = Checkpoints.read_params, names.to_torch

    def traced_read(self, step, chunk):
        doing[0] = f"reading {chunk[0]}" + (f" and {len(chunk) - 1} more" if len(chunk) > 1 else "")
        if FLAGS.largest in chunk:
            around["rss_before_largest_read_kib"] = vm_kib("VmRSS")
        values = read_params(self, step, chunk)
        if FLAGS.largest in chunk:
            around["rss_after_largest_read_kib"] = vm_kib("VmRSS")
        return values

    def traced_to_torch(name, value):
        doing[0] = f"converting and writing {name}"
        return to_torch(name, value)

    def sample():
        while not done.wait(0.02):
            rss = vm_kib("VmRSS")
            if rss > peak[0]:
                peak[:] = rss, doing[0]

    Checkpoints.read_params, names.to_torch = traced_read, traced_to_torch
    rss_before = vm_kib("VmRSS")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = os.path.join(work, f"hf_{FLAGS.dtype}")
    summary = hf_dir.export(os.path.join(work, "run"), out, dtype=FLAGS.dtype)
    done.set()
    sampler.join()
    return dict(summary, rss_before_export_kib=rss_before, sampled_peak_kib=peak[0], doing_at_sampled_peak=peak[1],
                vm_hwm_kib=vm_kib("VmHWM"), **around)


def child_load(work: str) -> dict:
    """`AutoModel.from_pretrained` of the float32 export, then a pass over every weight: the
    weights may stay mapped from the file until touched, which the resident set after the
    load alone would hide."""
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModel.from_pretrained(os.path.join(work, "hf_float32"), trust_remote_code=True)
    seconds = time.perf_counter() - start
    after_load = dict(anon_kib=vm_kib("RssAnon"), file_kib=vm_kib("RssFile"), peak_kib=vm_kib("VmHWM"))
    state = model.state_dict()
    start = time.perf_counter()
    with torch.no_grad():
        total = sum(v.sum().item() for v in state.values())  # reads every page once
    return dict(seconds=seconds, rss_after_load=after_load,
                touch_seconds=time.perf_counter() - start, checksum=total,
                rss_after_touch=dict(anon_kib=vm_kib("RssAnon"), file_kib=vm_kib("RssFile")),
                parameters=sum(v.numel() for v in state.values()), dtypes=sorted({str(v.dtype) for v in state.values()}),
                torch=torch.__version__, transformers=transformers.__version__)


CHILDREN = dict(make=child_make, imports=child_imports, export=child_export, load=child_load)


# --- The parent: runs the children one at a time and measures them. ------------------------

def measure(child: str, work: str, env: dict, **flag_values) -> dict:
    """Runs `child` in a fresh process; its report with wall seconds, the peak resident set
    (ru_maxrss of that process alone) and a timeline of its resident set every 0.1 s."""
    command = [sys.executable, os.path.abspath(__file__), f"--child={child}", f"--work={work}", f"--config={FLAGS.config}"]
    command += [f"--{k}={v}" for k, v in flag_values.items()]
    with open(os.path.join(work, f"{child}.log"), "w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        timeline, stop = [], threading.Event()

        def poll():
            while not stop.wait(0.1):
                timeline.append((round(time.perf_counter() - start, 2), round(vm_kib("VmRSS", process.pid) * 1024 / GB, 3)))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # that child's own rusage, unlike RUSAGE_CHILDREN's running max
        process.returncode, wall = os.waitstatus_to_exitcode(status), time.perf_counter() - start
        stop.set()
        poller.join()
        if process.returncode:
            log.seek(0)
            raise RuntimeError(f"--child={child} failed ({process.returncode}):\n{log.read()[-4000:]}")
    report = json.loads(next(line for line in stdout.splitlines() if line.startswith(RESULT))[len(RESULT):])
    step = max(1, len(timeline) // 100)  # at most ~100 points in the JSON
    return dict(report, wall_seconds=wall, peak_rss_kib=usage.ru_maxrss, rss_timeline_gb=timeline[::step])


def gb(kib: int) -> float:
    return kib * 1024 / GB


def main(argv):
    del argv
    if FLAGS.child:
        print(RESULT + json.dumps(CHILDREN[FLAGS.child](FLAGS.work), default=str), flush=True)
        return
    work = FLAGS.work or tempfile.mkdtemp(prefix="export_bench_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=tempfile.mkdtemp(prefix="hf_modules_", dir=work),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    # name: (dtype, extra environment). The last is a diagnosis, not a setting to use: with a
    # fixed mmap threshold glibc hands every freed buffer over 1 MiB straight back to the
    # system, which shows what the heap that glibc keeps after each chunk adds to the peak.
    runs = {dtype: (dtype, {}) for dtype in FLAGS.dtypes}
    if FLAGS.diagnose:
        runs["float32, MALLOC_MMAP_THRESHOLD_=1MiB"] = ("float32", dict(MALLOC_MMAP_THRESHOLD_=str(1 << 20)))
    try:
        made = measure("make", work, env)
        model_bytes, largest = made["float32_bytes"], made["largest_tensor"]
        print(f"checkpoint: {made['parameters'] / 1e6:.1f} M parameters, {model_bytes / GB:.2f} GB float32, "
              f"{made['seconds']:.0f} s to write, {made['checkpoint_params_bytes'] / GB:.2f} GB on disk (zstd); "
              f"largest {largest}")
        baseline = measure("imports", work, env)
        base_kib = baseline["peak_rss_kib"]
        print(f"import baseline: peak {gb(base_kib):.2f} GB")
        exports = {}
        for name, (dtype, extra_env) in runs.items():
            run = measure("export", work, dict(env, **extra_env), dtype=dtype, largest=largest["name"])
            extra = (run["peak_rss_kib"] - base_kib) * 1024
            run.update(dtype=dtype, env=extra_env, peak_minus_baseline_bytes=extra,
                       peak_minus_baseline_vs_model=extra / model_bytes, file_bytes=run["bytes"])
            exports[name] = run
            print(f"export {name}: {run['seconds']:.1f} s in export() ({run['wall_seconds']:.1f} s with start-up), "
                  f"peak {gb(run['peak_rss_kib']):.2f} GB = baseline + {extra / GB:.2f} GB "
                  f"({extra / model_bytes:.2f} x the float32 model), file {run['bytes'] / GB:.2f} GB; "
                  f"{gb(run['rss_before_largest_read_kib']):.2f} GB before reading {largest['name']}, "
                  f"{gb(run['rss_after_largest_read_kib']):.2f} GB after; sampled peak {gb(run['sampled_peak_kib']):.2f} GB "
                  f"while {run['doing_at_sampled_peak']}")
        load = None
        if "float32" in exports:
            load = measure("load", work, env)
            print(f"AutoModel.from_pretrained (float32): {load['seconds']:.1f} s, peak {gb(load['rss_after_load']['peak_kib']):.2f} GB "
                  f"(anonymous {gb(load['rss_after_load']['anon_kib']):.2f} GB, file-mapped "
                  f"{gb(load['rss_after_load']['file_kib']):.2f} GB); after reading every weight "
                  f"({load['touch_seconds']:.1f} s): peak {gb(load['peak_rss_kib']):.2f} GB (anonymous "
                  f"{gb(load['rss_after_touch']['anon_kib']):.2f} GB, file-mapped {gb(load['rss_after_touch']['file_kib']):.2f} GB)")
    finally:
        if FLAGS.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results_io.write("export_cpu", dict(
        config=os.path.relpath(FLAGS.config, REPO),
        model=dict((k, made[k]) for k in ("parameters", "tensors", "float32_bytes", "checkpoint_params_bytes", "largest_tensor")),
        checkpoint_write_seconds=made["seconds"],
        import_baseline=baseline,
        exports=exports,
        torch_load_float32=load,
        machine=dict(results_io.machine(), memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
    ))


if __name__ == "__main__":
    app.run(main)
