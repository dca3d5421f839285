"""A batch's records are read at once, not one at a time: on object storage each record is a
request (range_reads.RangeReads), so a batch read record by record waits one latency per
record. And the batches are those of the per-record path, bad records included."""
import logging
import os
import time
import urllib.parse
import urllib.request

import numpy as np
from grain._src.python.dataset.transformations.batch import BatchMapDataset

from caip_jax.data import pipeline, records
from test_faults_data import SHARDS, copy_set, flip_byte_inside, grouped_set_with_a_bad_chunk
from test_pipeline import make_preprocess

LATENCY = 0.25  # seconds the proxy adds to every request


def upload(emulator, url: str, path: str) -> None:
    """Writes the local file `path` to the emulator's object `url` (gs://B/NAME), directly."""
    bucket, name = url.removeprefix("gs://").split("/", 1)
    with open(path, "rb") as f:
        request = urllib.request.Request(
            f"{emulator.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(name)}",
            data=f.read(), method="POST", headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=30).read()


def per_record(monkeypatch):
    """train_batches as it was: grain's own batch (`MapDataset.batch`), which reads its elements
    one at a time, each through SkipCorrupt.__getitem__."""
    monkeypatch.setattr(pipeline, "BatchedReads", BatchMapDataset)


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_batch_from_object_storage_waits_about_one_latency_not_one_per_record(record_set, gcs, bucket, monkeypatch):
    from gcs import Proxy

    directory, _ = record_set
    shards = [f"{bucket}/records/{name}" for name in SHARDS]
    for url, name in zip(shards, SHARDS):
        upload(gcs, url, os.path.join(directory, name))
    remote = records.RecordSet(f"{bucket}/records", tuple(shards), (9, 9))
    proxy = Proxy(gcs.endpoint, latency=LATENCY)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)  # range_reads.RangeReads reads it when made
    try:
        preprocess = make_preprocess(record_set)
        batch = 8
        # A mixture of two sources, as data.train gives it: mix and batch both pass the reads on.
        batches = pipeline.train_batches([(remote, preprocess, 0.5), (remote, preprocess, 0.5)], batch, seed=0)
        batches[0]  # opens each source's readers (their index: a few requests a shard)
        requests, start = proxy.requests, time.perf_counter()
        got = [batches[k] for k in (1, 2)]
        elapsed = time.perf_counter() - start
        assert proxy.requests - requests == 2 * batch  # one request a record
        # One record at a time: 2 x 8 x 0.25 = 4 s at least. At once: a latency per source and batch
        # (the mixture reads its sources one after the other), 1 s, and some transfer.
        assert elapsed < 2 * batch * LATENCY / 2, elapsed
    finally:
        proxy.close()
    # The same batches as from the local copy.
    local = pipeline.train_batches([(directory, preprocess, 0.5), (directory, preprocess, 0.5)], batch, seed=0)
    for k, batch_k in zip((1, 2), got):
        assert_same(batch_k, local[k])


def test_batches_read_at_once_are_those_of_the_per_record_path_bad_records_included(record_set, tmp_path, monkeypatch, caplog):
    """A chunk that fails its hash fails the batched read of every record with it: those are read
    again in halves, and the bad one takes the per-record path. A JPEG that does not decode fails
    in preprocessing. Both are logged once and stood in for as before, with the same rng."""
    directory = copy_set(record_set, tmp_path)
    path = os.path.join(directory, SHARDS[1])
    flip_byte_inside(path, records.read_shard(path)[4])  # record 13 fails its hash
    samples = records.read_shard(os.path.join(directory, SHARDS[0]))
    broken = records.decode(samples[2])
    os.remove(os.path.join(directory, SHARDS[0]))
    writer = records.ShardWriter(str(tmp_path / "rewritten"), 1)
    writer.write_episode(0, samples[:2] + [records.encode(dict(broken, image=broken["image"][:40]))] + samples[3:])
    writer.close()
    os.rename(str(tmp_path / "rewritten" / "records-00000-of-00001.array_record"), os.path.join(directory, SHARDS[0]))
    preprocess = make_preprocess(record_set, with_metadata=True)
    sources = [(directory, preprocess, 0.7), (record_set[0], preprocess, 0.3)]
    steps = 8  # 56 samples of batch 7: every record of the damaged set at least twice

    with caplog.at_level(logging.ERROR):
        at_once = pipeline.train_batches(sources, 7, seed=2)
        got = [at_once[k] for k in range(steps)]
    logged_at_once = caplog.text
    caplog.clear()
    per_record(monkeypatch)
    with caplog.at_level(logging.ERROR):
        one_by_one = pipeline.train_batches(sources, 7, seed=2)
        want = [one_by_one[k] for k in range(steps)]
    for g, w in zip(got, want):
        assert_same(g, w)
    assert sum(int(b["skipped"].sum()) for b in got) >= 4  # both bad records, twice each
    assert "chunk data hash mismatch" in logged_at_once and f"{broken['episode_id']} frame {broken['frame_index']}" in logged_at_once
    assert logged_at_once.count("skipping a corrupt record") == caplog.text.count("skipping a corrupt record")


def test_a_bad_chunk_of_several_records_costs_each_of_them_in_a_batched_read(record_set, tmp_path):
    """A shard written 4 records a chunk (valid ArrayRecord, not ours): one flipped byte fails
    records 4 to 7; a batched read of the whole set gives what reading one by one gives."""
    directory = grouped_set_with_a_bad_chunk(record_set, tmp_path)
    samples = pipeline.eval_samples(directory, make_preprocess(record_set, with_metadata=True))
    at_once = samples._getitems(range(9))  # noqa: SLF001: what grain's batch calls
    assert [int(s["skipped"]) for s in at_once] == [0] * 4 + [1] * 4 + [0]
    for got, want in zip(at_once, [samples[i] for i in range(9)]):
        assert_same(got, want)
