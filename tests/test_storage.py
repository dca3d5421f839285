"""caip_jax.storage against a GCS emulator on loopback: files round-trip, writes are whole or
absent, a growing file survives GCS's lack of append, the tokenizer loads from a bucket, the
compilation cache is not downloaded at start, and a storage outage while restoring is retried,
never taken for a damaged checkpoint."""
import os
import subprocess
import sys

import grain
import jax
import ml_collections
import numpy as np
import pytest

from caip_jax import storage
from caip_jax.checkpoint import Checkpoints
from caip_jax.data.tokenizer import Tokenizer
from gcs import Proxy


def test_files_round_trip_through_the_bucket_and_nothing_is_written_locally(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_json(f"{bucket}/a/b.json", {"x": [1, 2]})
    storage.write_bytes(f"{bucket}/a/c/d.bin", b"\x00\x01")
    assert storage.read_json(f"{bucket}/a/b.json") == {"x": [1, 2]}
    assert storage.join(bucket, "a", "c", "d.bin") == f"{bucket}/a/c/d.bin"
    storage.move(f"{bucket}/a", f"{bucket}/moved/a.1")
    assert not storage.exists(f"{bucket}/a/b.json")
    assert storage.read_bytes(f"{bucket}/moved/a.1/c/d.bin") == b"\x00\x01"
    with pytest.raises(FileNotFoundError, match=f"{bucket}/a/b.json does not exist"):
        storage.read_bytes(f"{bucket}/a/b.json")
    assert os.listdir(tmp_path) == []


def test_a_local_copy_of_a_remote_file_or_directory_is_gone_after_use(bucket):
    storage.write_bytes(f"{bucket}/dir/a.bin", b"a")
    storage.write_bytes(f"{bucket}/dir/sub/b.bin", b"b")
    with storage.local_copy(f"{bucket}/dir") as local:
        assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"b"
    assert not os.path.exists(local)
    with storage.local_copy(f"{bucket}/dir/a.bin") as local:
        assert open(local, "rb").read() == b"a"


def test_a_staged_directory_is_uploaded_whole_and_not_at_all_after_an_error(bucket):
    with storage.staged_directory(f"{bucket}/set", last=("summary.json",)) as local:
        for name in ("summary.json", "records-0.bin", "sub/x.bin"):
            os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
            with open(os.path.join(local, name), "wb") as f:
                f.write(name.encode())
    for name in ("summary.json", "records-0.bin", "sub/x.bin"):
        assert storage.read_bytes(f"{bucket}/set/{name}") == name.encode()
    assert not os.path.exists(local)
    with pytest.raises(RuntimeError), storage.staged_directory(f"{bucket}/failed") as local:
        with open(os.path.join(local, "records-0.bin"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("the conversion failed")
    assert not storage.exists(f"{bucket}/failed/records-0.bin")


def test_a_growing_file_continues_what_the_bucket_holds_and_is_uploaded_whole(bucket):
    path = f"{bucket}/run/metrics.jsonl"
    first = storage.GrowingFile(path, upload_every=3600)
    first.write_line("1")
    first.write_line("2")
    assert not storage.exists(path)  # not yet: uploads are whole, at most every upload_every
    first.close()
    assert storage.read_text(path) == "1\n2\n"
    resumed = storage.GrowingFile(path, upload_every=0)  # a resumed run appends to its log
    resumed.write_line("3")
    assert storage.read_text(path) == "1\n2\n3\n"
    resumed.close()


def test_the_tokenizer_loads_from_a_bucket_file_or_directory(record_set, bucket):
    local = Tokenizer(record_set[1])
    storage.write_bytes(f"{bucket}/spm.model", storage.read_bytes(record_set[1]))
    storage.write_bytes(f"{bucket}/hf/tokenizer.model", storage.read_bytes(record_set[1]))
    texts = ["Pick up cup 3", "pick up the red cube with the left hand"]
    for path in (f"{bucket}/spm.model", f"{bucket}/hf"):
        np.testing.assert_array_equal(Tokenizer(path).encode(texts), local.encode(texts))
    with pytest.raises(FileNotFoundError, match="neither a sentencepiece .model file"):
        Tokenizer(f"{bucket}/missing.model")


def test_the_compilation_cache_on_a_bucket_is_not_downloaded_at_start(bucket, gcs):
    """Every start used to read and decompress every entry (to find ones cut short, which object
    storage cannot hold); with 20 entries of 256 KB, a start must fetch almost nothing."""
    entries = 20
    for i in range(entries):
        storage.write_bytes(f"{bucket}/cache/jit_step-{i:02d}-cache", os.urandom(256 << 10))
    proxy = Proxy(gcs.endpoint)
    try:
        program = f"from caip_jax import xla_cache; xla_cache.use({bucket + '/cache'!r})"
        env = dict(os.environ, **proxy.environment(), JAX_PLATFORMS="cpu")
        done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert proxy.bytes_sent < (256 << 10), f"{proxy.bytes_sent} bytes fetched at start"
    finally:
        proxy.close()


def real_outage_error(gcs) -> Exception:
    """The error tensorstore (orbax's arrays) raises when the store keeps answering 503: a
    ValueError with its status text, taken from a real read in a process whose endpoint is a
    proxy that fails every request (tensorstore reads its endpoint once per process)."""
    proxy = Proxy(gcs.endpoint, fail_share=1.0)
    program = """import tensorstore
spec = {"driver": "gcs", "bucket": "any",
        "context": {"gcs_request_retries": {"max_retries": 1, "initial_delay": "10ms", "max_delay": "20ms"}}}
try:
    tensorstore.KvStore.open(spec).result().read("x").result()
except ValueError as error:
    print(error)
"""
    try:
        done = subprocess.run([sys.executable, "-c", program], env=dict(os.environ, **proxy.environment()),
                              capture_output=True, text=True, timeout=60)
    finally:
        proxy.close()
    assert "503" in done.stdout, done.stdout + done.stderr
    return ValueError(done.stdout.strip())


@pytest.fixture
def two_steps(tmp_path):
    """A run directory with whole steps 1 and 2 (tiny trees, a grain iterator)."""
    params, opt_state = {"w": np.arange(3.0, dtype=np.float32)}, {"m": np.zeros(3, np.float32)}
    config = ml_collections.ConfigDict(dict(data=dict(workers=0)))
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpoints = Checkpoints(str(tmp_path), asynchronous=False)
    for step in (1, 2):
        next(iterator)
        checkpoints.save(step, jax.tree.map(lambda x: x + step, params), opt_state, iterator, config, {}, {})
    checkpoints.close()
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return str(tmp_path), abstract(params), abstract(opt_state), iterator


def test_an_outage_while_restoring_is_retried_and_the_newest_step_restored(gcs, two_steps, monkeypatch):
    outage = real_outage_error(gcs)
    assert storage.is_transient(outage), outage
    workdir, params, opt_state, iterator = two_steps
    real, failures = Checkpoints._restore_whole, [outage, outage]

    def flaky(self, *args):
        if failures:
            raise failures.pop()
        return real(self, *args)

    monkeypatch.setattr(Checkpoints, "_restore_whole", flaky)
    monkeypatch.setattr(storage, "RETRY_FIRST_WAIT_S", 0.01)
    step, restored = Checkpoints(workdir).restore_run(params, opt_state, iterator, 0)
    assert step == 2 and float(restored["params"]["w"][0]) == 2.0
    assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))


def test_an_outage_that_persists_is_an_error_and_no_step_is_set_aside(gcs, two_steps, monkeypatch):
    outage = real_outage_error(gcs)
    workdir, params, opt_state, iterator = two_steps

    def down(self, *args):
        raise outage

    monkeypatch.setattr(Checkpoints, "_restore_whole", down)
    monkeypatch.setattr(storage, "RETRY_FIRST_WAIT_S", 0.01)
    with pytest.raises(storage.StorageError, match="checkpoint step 2 .* the step is kept"):
        Checkpoints(workdir).restore_run(params, opt_state, iterator, 0)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))


def test_lost_data_still_falls_back_to_the_step_before(two_steps):
    workdir, params, opt_state, iterator = two_steps
    for folder, _, names in os.walk(os.path.join(workdir, "checkpoints", "2", "opt_state")):
        for name in names:
            os.remove(os.path.join(folder, name))
    step, _ = Checkpoints(workdir).restore_run(params, opt_state, iterator, 0)
    assert step == 1
    assert [name.split(".")[0] for name in os.listdir(os.path.join(workdir, "unusable_checkpoints"))] == ["2"]


@pytest.mark.parametrize("error, transient", [
    (FileNotFoundError("gs://b/x"), False),
    (OSError("Forbidden: gs://b/x"), False),
    (MemoryError(), False),
    (ValueError("DATA_LOSS: Error reading ocdbt manifest"), False),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
])
def test_what_counts_as_transient(error, transient):
    assert storage.is_transient(error) == transient


def test_check_access_names_the_path_and_the_fix(bucket, gcs, tmp_path):
    with pytest.raises(storage.StorageError, match=r"--x=gs://no-such-bkt/y: the bucket gs://no-such-bkt does not exist"):
        storage.check_access("gs://no-such-bkt/y", what="--x")
    with pytest.raises(storage.StorageError, match=f"--x={bucket}/absent does not exist"):
        storage.check_access(f"{bucket}/absent", what="--x")
    storage.check_access(f"{bucket}/new/run", write=True)  # writable; the probe object is gone again
    assert not [name for _, _, names in os.walk(gcs.local_path(bucket)) for name in names]
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_access(str(tmp_path / "absent"))


def test_a_shard_deleted_mid_run_stops_the_batches_naming_it(record_set, bucket, gcs):
    """Not taken for corrupt records to skip: that would change the data, and differently after a
    restart. The error names the shard and says what to do."""
    from caip_jax.data import convert, pipeline
    from test_convert import OPTIONS

    convert.convert("npz", os.path.join(os.path.dirname(record_set[0]), "npz"), f"{bucket}/records", OPTIONS, shards=2)
    opened = pipeline.open_record_set(f"{bucket}/records")
    preprocess = pipeline.Preprocess(record_set[1], 32, 16, 8)
    batches = pipeline.train_batches([(opened, preprocess, 1.0)], 8, seed=0)
    assert len(batches[0]["text"]) == 8
    os.remove(gcs.local_path(opened.shards[1]))
    with pytest.raises(pipeline.ShardReadError, match=r"records-00001-of-00002.array_record record \d+ cannot be read .* restore it"):
        for step in range(1, 4):
            batches[step]
