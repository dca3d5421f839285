"""gs:// records read one exact byte range each (range_reads.RangeReads), against array_record's
own reader of the same files: the same bytes, one request a record and no byte more, a flaky store
retried, an outage or a replaced shard named, and a shard in another layout read all the same."""
import os
import pickle

import numpy as np
import pytest
from array_record.python import array_record_module

from caip_jax.data import pipeline, range_reads, records
from gcs import Proxy
from test_faults_data import SHARDS
from test_pipeline import make_preprocess
from test_read_concurrency import upload


def local_records(path: str) -> list[bytes]:
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    return reader.read(list(range(reader.num_records())))


@pytest.fixture
def shards(record_set, gcs, bucket, tmp_path):
    """The record set's two shards on the bucket, and a third written 4 records a chunk (a
    layout range reads do not read: array_record reads it) -> (urls, local paths, counts)."""
    directory, _ = record_set
    paths = [os.path.join(directory, name) for name in SHARDS]
    grouped = str(tmp_path / "grouped.array_record")
    writer = array_record_module.ArrayRecordWriter(grouped, "group_size:4,uncompressed")
    for record in local_records(paths[0])[::-1]:
        writer.write(record)
    writer.close()
    paths.append(grouped)
    urls = [f"{bucket}/records/{os.path.basename(p)}" for p in paths]
    for url, path in zip(urls, paths):
        upload(gcs, url, path)
    return urls, paths, [9, 9, 9]


def test_every_record_is_the_one_array_record_reads_in_one_request_of_its_bytes(shards, gcs):
    urls, paths, counts = shards
    want = [r for path in paths for r in local_records(path)]
    proxy = Proxy(gcs.endpoint)
    try:
        source = pickle.loads(pickle.dumps(range_reads.RangeReads(urls, counts, proxy.endpoint)))  # as loader workers get it
        source._getitems([0, 9, 18])  # reads each shard's index
        requests, sent = proxy.requests, proxy.bytes_sent
        order = np.random.default_rng(0).permutation(18).tolist()  # the two shards range reads read
        got = source._getitems(order)
        assert got == [want[k] for k in order]
        assert proxy.requests - requests == len(order)
        block_headers = sum(len(range(-(-b // 65536) * 65536, e, 65536))  # each 24 bytes, inside a span
                            for shard in (0, 1) for b, e in zip(source._shard(shard).ranges.begins, source._shard(shard).ranges.ends))
        assert proxy.bytes_sent - sent == sum(len(r) for r in got) + 24 * block_headers
        assert [source[k] for k in range(18, 27)] == want[18:]  # the grouped shard, by array_record
        assert source._shard(2).ranges is None
    finally:
        proxy.close()
    with pytest.raises(IndexError):
        source[27]


def test_a_flaky_store_is_retried_and_reads_the_same_records(shards, gcs, monkeypatch):
    urls, paths, counts = shards
    monkeypatch.setattr(range_reads, "FIRST_WAIT_S", 0.01)
    proxy = Proxy(gcs.endpoint, fail_share=0.3, seed=1)
    try:
        source = range_reads.RangeReads(urls[:2], counts[:2], proxy.endpoint)
        assert source._getitems(list(range(18))) == [r for path in paths[:2] for r in local_records(path)]
        assert proxy.requests > 18 + 2 * 3  # some failed and were asked again
    finally:
        proxy.close()


def test_an_outage_longer_than_the_retries_stops_training_naming_the_shard(shards, record_set, gcs, monkeypatch):
    urls, _, counts = shards
    monkeypatch.setattr(range_reads, "FIRST_WAIT_S", 0.001)
    proxy = Proxy(gcs.endpoint, fail_share=1.0, fail_matching="alt=media")  # listings pass: records fail
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    try:
        remote = records.RecordSet(os.path.dirname(urls[0]), tuple(urls[:2]), (9, 9))
        batches = pipeline.train_batches([(remote, make_preprocess(record_set), 1.0)], 4, seed=0)
        with pytest.raises(pipeline.ShardReadError, match=r"records-0000[01]-of-00002.array_record record \d+ cannot be read .*HTTP 503"):
            batches[0]
    finally:
        proxy.close()


def test_a_shard_replaced_after_its_index_was_read_is_named_not_misread(shards, gcs):
    """The index is read from one generation of the object, and every record from that generation:
    a shard rewritten meanwhile fails by name instead of yielding bytes from another layout."""
    urls, paths, counts = shards
    source = range_reads.RangeReads(urls[:2], counts[:2], gcs.endpoint)
    assert source[0] == local_records(paths[0])[0]
    upload(gcs, urls[0], paths[1])  # another shard's bytes under the same name
    with pytest.raises(FileNotFoundError, match=r"records-00000-of-00002.array_record \(generation \d+\) is not there"):
        source[1]
    fresh = range_reads.RangeReads(urls[:2], counts[:2], gcs.endpoint)  # a set opened again reads the new one
    assert fresh[1] == local_records(paths[1])[1]
