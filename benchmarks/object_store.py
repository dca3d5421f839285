"""Input pipeline throughput reading records from object storage, against local disk, in one run.

  python benchmarks/object_store.py [--records 512] [--seconds 8] [--rounds 2] [--workers 8] [--threads 4]

The host half of the training pipeline as training runs it (`pipeline.train_batches` +
`pipeline.iterate` with config.data.workers' default 8 loader processes of its default 4
threads) reads one record set from local disk and from a GCS emulator (fake-gcs-server,
tests/gcs.py) through a loopback TCP relay that adds a latency to every request (`gcs.Relay`):
none, 20 ms and 50 ms. gs:// is read as training reads it, by `range_reads.RangeReads` (one
request of exactly a record's bytes, on kept connections); at 50 ms also by array_record's own
GCS reader (the pipeline before RangeReads). Only 127.0.0.1 is used.

The harness must not take the CPU it measures. The machine's CPUs are split in two
(`--split_cpus`, the default): the pipeline (this process's main thread and the loader workers it
starts) runs on the first half, in every setting, local disk included; the emulator and the relays
(threads started before the split) on the rest. And the relay is an asyncio TCP relay, not
`gcs.Proxy` (Python's HTTP server, a thread and a new upstream connection a request): at 50 ms
the emulator and the proxy cost 2.8 ms of CPU a record, more than one core has at local disk's
rate here; the emulator and the relay, 1.8. The emulator without added latency shows what is
left of the harness's cost.

Figures: samples/s per setting (a fresh pipeline each, measured after its workers start and a
warm-up; medians over rounds, ratios within a round), relay requests per sample meanwhile, how
busy the pipeline's and the harness's CPUs were, and, from batched reads of 256 distinct random
records through a 50 ms `gcs.Proxy` (which counts bytes), each reader's requests per record and
bytes fetched per byte used, on the benchmark's shards and on one shard of 256 records (what
caip-make-records' default 8 shards hold for a set of 2k records; GCS's cost per request does
not depend on the object's size, the emulator's does, which is why the benchmark's set has
small shards).
Writes benchmarks/results/object_store.json.
"""
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import grain
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import gcs  # noqa: E402  (tests/gcs.py: the emulator, the relay and the proxy)
import results_io  # noqa: E402
from caip_jax.data import convert, pipeline, range_reads, records, tokenizer  # noqa: E402
from caip_jax.data.sources import demo_world  # noqa: E402

assert "gcsfs" not in sys.modules  # it reads STORAGE_EMULATOR_HOST once, when imported: see main()

flags.DEFINE_integer("records", 512, "Records in the benchmark's set.")
flags.DEFINE_integer("shard_records", 32, "Records per shard of the benchmark's set.")
flags.DEFINE_float("seconds", 8.0, "Measuring time per setting and round.")
flags.DEFINE_float("warmup", 2.0, "Seconds of batches before measuring, once the workers run.")
flags.DEFINE_integer("rounds", 2, "Rounds of the settings (the second in reverse order, ...).")
flags.DEFINE_integer("batch", 32, "Batch size of the pipeline (per host).")
flags.DEFINE_integer("workers", 8, "Loader processes (config.data.workers' default).")
flags.DEFINE_integer("threads", 4, "Threads per loader process (pipeline.iterate's default).")
flags.DEFINE_bool("split_cpus", True, "Pipeline on the first half of the CPUs, emulator and relays on the rest.")
FLAGS = flags.FLAGS
SIZE, BUCKET = 256, "bench"
EMULATOR: gcs.Emulator | None = None  # started by main(): loader workers import this module again
LATENCIES = {"emulator_0ms": 0.0, "emulator_20ms": 0.02, "emulator_50ms": 0.05}


def make_records(directory: str, count: int, per_shard: int) -> float:
    """`count` demo-world records (288-pixel JPEG, horizon 64) in shards of `per_shard`: one
    converted episode's records, repeated under other episode ids. Returns bytes per record."""
    episode = os.path.join(directory, "episode")
    convert.convert("demo_world", "", episode, convert.ConvertOptions(horizon=64, stride=1),
                    dict(num_episodes=1, image_size=320, num_frames=64 + 32), shards=1)
    samples = [records.decode(r) for path in records.shard_paths(episode) for r in records.read_shard(path)]
    shards = -(-count // per_shard)
    writer = records.ShardWriter(directory, shards)
    encoded = [records.encode(dict(samples[i % len(samples)], episode_id=f"copy_{i // len(samples)}"))
               for i in range(count)]
    for shard in range(shards):
        writer.write_episode(shard, encoded[shard * per_shard:(shard + 1) * per_shard])
    writer.close()
    shutil.copy(os.path.join(episode, "stats.json"), directory)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(dict(records=count), f)
    shutil.rmtree(episode)
    return float(np.mean([len(r) for r in encoded]))


def upload(path: str, name: str) -> None:
    """The local file `path` to gs://BUCKET/`name`, straight to the emulator (no proxy)."""
    with open(path, "rb") as f:
        request = urllib.request.Request(
            f"{EMULATOR.endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name)}",
            data=f.read(), method="POST", headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=60).read()


def array_record_source(record_set: records.RecordSet) -> pipeline.ConcurrentReads:
    """The record set's source that array_record's own GCS reader reads (the path before RangeReads)."""
    return pipeline.ConcurrentReads([f"{path}[0:{count}]" for path, count in zip(record_set.shards, record_set.counts)])


def with_array_record_reads(batches):
    """`pipeline.train_batches` output with its records read by `array_record_source`."""
    samples = batches._parent._parent._parent
    assert isinstance(samples, pipeline.SkipCorrupt), type(samples)
    samples._records = grain.MapDataset.source(array_record_source(samples._set))
    return batches


def read_cost(record_set: records.RecordSet, proxy: gcs.Proxy, count: int = 256) -> dict:
    """Requests per record and bytes the proxy sent per byte of record, for one batched read of
    `count` random records of `record_set` (indexes read beforehand) by each reader."""
    costs = {}
    for name, source in (("range_reads", range_reads.RangeReads(record_set.shards, record_set.counts, proxy.endpoint)),
                         ("array_record", array_record_source(record_set))):
        total = len(source)
        source._getitems(list(range(0, total, max(1, total // len(record_set.shards)))))  # opens every shard
        keys = np.random.default_rng(0).permutation(total)[:count].tolist()  # distinct: each one request
        requests, sent, start = proxy.requests, proxy.bytes_sent, time.perf_counter()
        used = sum(map(len, source._getitems(keys)))
        costs[name] = dict(records=count, seconds=time.perf_counter() - start,
                           requests_per_record=(proxy.requests - requests) / count,
                           bytes_fetched_per_byte_used=(proxy.bytes_sent - sent) / used)
    return costs


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """CPU index -> (busy, total) clock ticks since boot, from /proc/stat (time stolen by the
    hypervisor counts as busy: it was not ours)."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])  # guest is in user
                ticks[int(name[3:])] = (used := user + nice + system + irq + softirq + steal, used + idle + iowait)
    return ticks


def busy(before: dict, after: dict, cpus: list[int]) -> float:
    """The share of the time `cpus` were busy between two `cpu_ticks()`."""
    return sum(after[c][0] - before[c][0] for c in cpus) / max(1, sum(after[c][1] - before[c][1] for c in cpus))


def measure(batches, relay: gcs.Relay | None, pipeline_cpus: list[int], harness_cpus: list[int]) -> dict:
    """Samples/s of a fresh pipeline.iterate over `batches` for FLAGS.seconds, after all its
    workers have started and FLAGS.warmup seconds more; with the relay's requests per sample and
    how busy the pipeline's and the harness's CPUs were meanwhile."""
    iterator = pipeline.iterate(batches, FLAGS.workers, FLAGS.threads)
    start = time.perf_counter()
    for _ in range(max(1, FLAGS.workers)):  # batch k comes from worker k mod workers: each has started
        next(iterator)
    startup, start = time.perf_counter() - start, time.perf_counter()
    while time.perf_counter() - start < FLAGS.warmup:
        next(iterator)
    requests, count, ticks, start = relay.requests if relay else 0, 0, cpu_ticks(), time.perf_counter()
    while time.perf_counter() - start < FLAGS.seconds:
        next(iterator)
        count += FLAGS.batch
    wall, after = time.perf_counter() - start, cpu_ticks()
    figures = dict(rate=count / wall, startup_seconds=startup, pipeline_cpus_busy=busy(ticks, after, pipeline_cpus),
                   harness_cpus_busy=busy(ticks, after, harness_cpus))
    if relay:
        figures["requests_per_sample"] = (relay.requests - requests) / count
    iterator.close()
    return figures


def main(argv):
    del argv
    global EMULATOR
    cpus = sorted(os.sched_getaffinity(0))
    pipeline_cpus, harness_cpus = (cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]) if FLAGS.split_cpus else (cpus, cpus)
    # Affinity is per thread on Linux and inherited by the threads and processes a thread starts:
    # the emulator and the relays' threads start here, the loader workers after the split.
    os.sched_setaffinity(0, harness_cpus)
    EMULATOR = gcs.Emulator()
    relays = {name: gcs.Relay(EMULATOR.endpoint, latency) for name, latency in LATENCIES.items()}
    counting = gcs.Proxy(EMULATOR.endpoint, latency=LATENCIES["emulator_50ms"])
    os.sched_setaffinity(0, pipeline_cpus)
    # Every client points at the emulator before it first touches gs:// (gcsfs reads
    # STORAGE_EMULATOR_HOST once, when imported). RangeReads takes the endpoint it reads when it
    # is made, array_record whenever it opens a reader (CLOUD_STORAGE_EMULATOR_ENDPOINT, which the
    # loader workers inherit when they start): both are pointed at each relay in turn.
    os.environ.update(EMULATOR.environment())
    work = tempfile.mkdtemp(prefix="object_store_")
    local = os.path.join(work, "records")
    record_bytes = make_records(local, FLAGS.records, FLAGS.shard_records)
    EMULATOR.create_bucket(BUCKET)
    for path in sorted(glob.glob(os.path.join(local, "*"))):
        upload(path, f"records/{os.path.basename(path)}")
    remote = f"gs://{BUCKET}/records"
    # One shard of 256 records (~14 MB), as a record set of 2k records in 8 shards has.
    writer = records.ShardWriter(os.path.join(work, "big"), 1)
    writer.write_episode(0, [r for path in records.shard_paths(local) for r in records.read_shard(path)][:256])
    writer.close()
    upload(os.path.join(work, "big", records.SHARD_PATTERN.format(index=0, count=1)), "big/records-00000-of-00001.array_record")

    texts = [f"{v} the {c} {s} with the {h} hand" for v in demo_world.VERBS for c in demo_world.COLOURS
             for s in demo_world.SHAPES for h in ("left", "right")]
    spm = tokenizer.train_sentencepiece(texts * 4, os.path.join(work, "spm"), 512)
    preprocess = pipeline.Preprocess(spm, SIZE, 64, 64)

    costs = {}
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = counting.endpoint
    costs["benchmark_shards"] = read_cost(pipeline.open_record_set(remote), counting)
    costs["shard_of_256_records"] = read_cost(pipeline.open_record_set(f"gs://{BUCKET}/big"), counting)
    print("read cost at 50 ms:", costs)

    settings = {"local_disk": (local, None, "range_reads")}
    settings.update({name: (remote, relays[name], "range_reads") for name in LATENCIES})
    settings["emulator_50ms_array_record"] = (remote, relays["emulator_50ms"], "array_record")
    rounds = []
    for r in range(FLAGS.rounds):
        figures = {}
        for name in (list(settings) if r % 2 == 0 else list(reversed(settings))):
            directory, relay, reader = settings[name]
            endpoint = relay.endpoint if relay else EMULATOR.endpoint
            os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = os.environ["STORAGE_EMULATOR_HOST"] = endpoint
            batches = pipeline.train_batches([(pipeline.open_record_set(directory), preprocess, 1.0)], FLAGS.batch, seed=0)
            if reader == "array_record":
                batches = with_array_record_reads(batches)
            figures[name] = measure(batches, relay, pipeline_cpus, harness_cpus)
            print(name, {k: round(v, 2) for k, v in figures[name].items()}, flush=True)
        rounds.append(figures)
    for server in [*relays.values(), counting]:
        server.close()
    EMULATOR.close()
    shutil.rmtree(work, ignore_errors=True)

    def median(fn):
        return statistics.median(fn(r) for r in rounds)

    summary = {name: median(lambda r: r[name]["rate"]) for name in settings}
    for name in list(LATENCIES) + ["emulator_50ms_array_record"]:
        summary[f"{name}_vs_local_disk"] = median(lambda r: r[name]["rate"] / r["local_disk"]["rate"])
    for name in ("emulator_20ms", "emulator_50ms", "emulator_50ms_array_record"):
        summary[f"{name}_vs_emulator_0ms"] = median(lambda r: r[name]["rate"] / r["emulator_0ms"]["rate"])
    result = dict(
        figures=summary,
        requests_per_sample={name: median(lambda r: r[name]["requests_per_sample"]) for name in settings if settings[name][1]},
        cpus_busy={name: dict(pipeline=median(lambda r: r[name]["pipeline_cpus_busy"]),
                              harness=median(lambda r: r[name]["harness_cpus_busy"])) for name in settings},
        read_cost_at_50ms=costs,
        rounds=rounds,
        records=FLAGS.records,
        shard_records=FLAGS.shard_records,
        record_bytes=record_bytes,
        batch=FLAGS.batch,
        workers=FLAGS.workers,
        threads=FLAGS.threads,
        pipeline_cpus=pipeline_cpus,
        harness_cpus=harness_cpus,
        image_size=SIZE,
        machine=results_io.machine(),
    )
    results_io.write("object_store", result)


if __name__ == "__main__":
    app.run(main)
