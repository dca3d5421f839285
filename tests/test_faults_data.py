"""Faults inside record sets and loader workers, caused here: a deleted, a truncated and a
corrupted shard, broken JSON, and a trainer killed by SIGKILL with loader workers running."""
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from array_record.python import array_record_module

import tiny_run_config
from caip_jax.data import batch_ring, convert, pipeline, records
from caip_jax.evaluate import features
from test_convert import OPTIONS, rigid_episode, write_npz
from test_pipeline import make_preprocess

SHARDS = ["records-00000-of-00002.array_record", "records-00001-of-00002.array_record"]  # 9 records each


def copy_set(record_set, tmp_path) -> str:
    directory = str(tmp_path / "records")
    shutil.copytree(record_set[0], directory)
    return directory


def epoch_ids(record_set_or_dir, preprocess, batch: int, steps: int) -> list[tuple[str, int]]:
    """(episode_id, frame_index) of every training sample of the first `steps` batches."""
    batches = pipeline.train_batches([(record_set_or_dir, preprocess, 1.0)], batch, seed=0)
    return [(e, int(f)) for k in range(steps) for e, f in zip(batches[k]["episode_id"], batches[k]["frame_index"])]


def shard_ids(path: str) -> list[tuple[str, int]]:
    return [(s["episode_id"], s["frame_index"]) for s in map(records.decode, records.read_shard(path))]


def test_a_deleted_shard_is_an_error_naming_it_or_skipped_and_counted(record_set, tmp_path, caplog):
    directory = copy_set(record_set, tmp_path)
    kept = shard_ids(os.path.join(directory, SHARDS[0]))
    os.remove(os.path.join(directory, SHARDS[1]))
    preprocess = make_preprocess(record_set, with_metadata=True)
    with pytest.raises(ValueError) as error:  # records.RecordSetError
        pipeline.train_batches([(directory, preprocess, 1.0)], 3, seed=0)  # as training opens it
    for part in (f"{SHARDS[1]} is absent", "summary.json counts 18 records, the readable shards hold 9 (9 lost)",
                 "caip-make-records", "data.missing_shards=skip"):
        assert part in str(error.value)

    with caplog.at_level(logging.WARNING):
        opened = pipeline.open_record_set(directory, missing_shards="skip")
    assert f"{SHARDS[1]} is absent" in caplog.text and "training on the other 1 shards" in caplog.text
    assert opened.loss() == {"missing_shards": [SHARDS[1]], "records_lost": 9}
    # Each epoch (3 batches of 3) is a permutation of the remaining shard's records.
    ids = epoch_ids(opened, preprocess, 3, 6)
    assert sorted(ids[:9]) == sorted(ids[9:]) == sorted(kept) and len(set(kept)) == 9

    # Against that, a conversion of fewer episodes than shards leaves index numbers out by design:
    # summary.json's count says nothing is missing.
    rng = np.random.default_rng(0)
    for i in range(2):
        write_npz(str(tmp_path / "npz"), f"episode_{i}", **rigid_episode(rng))
    small = str(tmp_path / "small")
    convert.convert("npz", str(tmp_path / "npz"), small, OPTIONS, shards=4)
    assert len(records.shard_paths(small)) == 2
    assert pipeline.open_record_set(small).loss() == {"missing_shards": [], "records_lost": 0}


def test_a_truncated_shard_is_an_error_naming_it_or_skipped_and_counted(record_set, tmp_path):
    directory = copy_set(record_set, tmp_path)
    kept = shard_ids(os.path.join(directory, SHARDS[1]))
    path = os.path.join(directory, SHARDS[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    preprocess = make_preprocess(record_set, with_metadata=True)
    with pytest.raises(ValueError, match=f"{SHARDS[0]} cannot be read .*9 lost"):  # records.RecordSetError
        pipeline.train_batches([(directory, preprocess, 1.0)], 3, seed=0)
    with pytest.raises(ValueError, match=f"{SHARDS[0]} cannot be read"):
        records.read_shard(path)  # tools that read whole shards name it too

    opened = pipeline.open_record_set(directory, missing_shards="skip")
    assert opened.loss() == {"missing_shards": [SHARDS[0]], "records_lost": 9}
    assert sorted(epoch_ids(opened, preprocess, 3, 3)) == sorted(kept)


def test_a_truncated_shard_of_the_tfds_form_is_named(record_set, tmp_path):
    from caip_jax.data import tfds_builder

    tfds_builder.build(record_set[0], str(tmp_path))
    version_dir = str(tmp_path / tfds_builder.NAME / "1.0.0")
    (path,) = glob.glob(os.path.join(version_dir, "*.array_record-*"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 300)
    with pytest.raises(ValueError, match=f"{os.path.basename(path)} cannot be read .*dataset_info.json counts 18"):
        pipeline.eval_samples(version_dir, make_preprocess(record_set))


def flip_byte_inside(path: str, record: bytes) -> None:
    """Flips one byte in the middle of `record`'s bytes in the (uncompressed) shard at `path`."""
    with open(path, "r+b") as f:
        content = bytearray(f.read())
        at = content.find(record)
        assert at > 0 and content.find(record, at + 1) < 0
        content[at + len(record) // 2] ^= 0xFF
        f.seek(0)
        f.write(content)


def test_a_chunk_that_fails_its_hash_is_skipped_by_name_and_training_resumes_exactly(record_set, tmp_path, caplog):
    directory = copy_set(record_set, tmp_path)
    path = os.path.join(directory, SHARDS[1])
    bad = records.decode(records.read_shard(path)[4])
    flip_byte_inside(path, records.read_shard(path)[4])
    with pytest.raises(RuntimeError, match="chunk data hash mismatch"):  # the fault is real
        array_record_module.ArrayRecordReader(path).read([4])
    preprocess = make_preprocess(record_set, with_metadata=True)

    def batches():  # built afresh each time, as a restarted trainer does
        return pipeline.train_batches([(directory, preprocess, 1.0)], 4, seed=0)

    steps, stop = 9, 4  # 36 samples: two epochs of the 18 records
    with caplog.at_level(logging.ERROR):
        straight = pipeline.iterate(batches())
        expected = [next(straight) for _ in range(steps)]
    assert f"{directory} {SHARDS[1]} record 4" in caplog.text and "chunk data hash mismatch" in caplog.text
    seen = [(e, f) for b in expected for e, f in zip(b["episode_id"], b["frame_index"])]
    assert (bad["episode_id"], bad["frame_index"]) not in seen
    # Once an epoch the bad record's stream position was replaced, and counted.
    assert sum(int(b["skipped"].sum()) for b in expected) == 2

    interrupted = pipeline.iterate(batches(), workers=1)  # the skip also happens in a loader process
    for _ in range(stop):
        next(interrupted)
    state = interrupted.get_state()
    interrupted.close()
    resumed = pipeline.iterate(batches(), workers=1)
    resumed.set_state(state)
    for want in expected[stop:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    resumed.close()


def test_evaluation_leaves_out_a_record_that_fails_its_hash_and_keeps_every_other_row_aligned(record_set, tmp_path, caplog):
    """Evaluation cannot use a stand-in: the next record's features under the failed one's labels
    would be a wrong row. The failed record is left out and named; every other row is its own."""
    directory = copy_set(record_set, tmp_path)
    path = os.path.join(directory, SHARDS[1])
    flip_byte_inside(path, records.read_shard(path)[4])
    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = record_set
    encoder = features.initialised(config, seed=0)
    intact = features.extract(encoder, record_set[0], batch_size=8)
    with caplog.at_level(logging.WARNING):
        damaged = features.extract(encoder, directory, batch_size=8)
    failed = 9 + 4  # record 4 of the second shard
    kept = [i for i in range(18) if i != failed]
    assert intact["record_index"].tolist() == list(range(18))
    assert damaged["record_index"].tolist() == kept
    assert f"left out 1 of 18 records that could not be read or decoded (record indices [{failed}]" in caplog.text
    assert set(damaged) == set(intact)
    for key in set(intact) - {"labels", "record_index"}:
        if intact[key].dtype.kind == "f":
            np.testing.assert_allclose(damaged[key], intact[key][kept], rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(damaged[key], intact[key][kept], err_msg=key)
    for label, values in intact["labels"].items():
        np.testing.assert_array_equal(damaged["labels"][label], values[kept], err_msg=label)


def grouped_set_with_a_bad_chunk(record_set, tmp_path) -> str:
    """A record set of the first shard rewritten 4 records a chunk (valid ArrayRecord, not ours)
    with one byte flipped inside record 5: chunk 1, records 4 to 7, fails its hash."""
    originals = records.read_shard(os.path.join(record_set[0], SHARDS[0]))
    directory = str(tmp_path / "grouped")
    os.makedirs(directory)
    path = os.path.join(directory, "records-00000-of-00001.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:4,uncompressed")
    for record in originals:
        writer.write(record)
    writer.close()
    flip_byte_inside(path, originals[5])
    return directory


def test_every_record_of_a_bad_chunk_fails_and_each_is_counted(record_set, tmp_path, caplog):
    """A shard written 4 records a chunk (not ours, but valid ArrayRecord): one flipped byte
    costs the 4 records of its chunk, and each is skipped and counted on its own."""
    directory = grouped_set_with_a_bad_chunk(record_set, tmp_path)
    with caplog.at_level(logging.ERROR):
        samples = list(pipeline.eval_samples(directory, make_preprocess(record_set, with_metadata=True)))
    assert [int(s["skipped"]) for s in samples] == [0] * 4 + [1] * 4 + [0]
    for position in range(4, 8):
        assert f"records-00000-of-00001.array_record record {position} " in caplog.text
    originals = records.read_shard(os.path.join(record_set[0], SHARDS[0]))
    stand_in = records.decode(originals[8])  # the next readable record of the stream
    assert all(s["frame_index"] == stand_in["frame_index"] and s["episode_id"] == stand_in["episode_id"]
               for s in samples[4:9])


@pytest.mark.parametrize("name", ["stats.json", "summary.json"])
def test_json_that_does_not_parse_names_the_file_and_the_fix(record_set, tmp_path, name):
    directory = copy_set(record_set, tmp_path)
    with open(os.path.join(directory, name), "r+") as f:
        f.truncate(40)  # cut off mid-value
    message = rf"{directory}/{name} is not valid JSON \(.*\): restore the file, or rebuild the record set \(caip-make-records"
    with pytest.raises(ValueError, match=message):
        records.read_json(directory, name)
    if name == "summary.json":  # read when the set is opened, before any batch
        with pytest.raises(ValueError, match=message):
            pipeline.train_batches([(directory, make_preprocess(record_set), 1.0)], 3, seed=0)


def test_rings_of_owners_that_are_gone_are_removed(tmp_path):
    own = os.path.basename(batch_ring.make_directory()).split("-")[2]  # "PID.START" of this process
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = os.getpid()
    names = {
        f"caip-batches-{own}-live": True,
        f"caip-batches-{gone.stdout.strip()}.123-dead": False,
        f"caip-batches-{pid}.{int(own.split('.')[1]) + 1}-reused": False,  # same pid, a later process
        "caip-batches-other": True,  # not a name of ours: left alone
    }
    for name in names:
        os.makedirs(tmp_path / name / "ring-1")
    assert sorted(batch_ring.remove_orphans(str(tmp_path))) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment holds CAIP_FAULT_TAG=tag: a launched run and every process
    it started, wherever they were reparented (not this test process, which set the variable)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry == str(os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"CAIP_FAULT_TAG={tag}".encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):  # not a process, or gone meanwhile
            pass
    return found


@pytest.mark.slow
def test_sigkill_of_the_trainer_ends_its_loader_workers_and_removes_their_rings(record_set, tmp_path, monkeypatch):
    from test_train import config_flags, launch, metrics, run_config

    tag = uuid.uuid4().hex
    monkeypatch.setenv("CAIP_FAULT_TAG", tag)
    workdir = str(tmp_path / "run")
    flags = config_flags(run_config(record_set), workdir) + ["--config.data.workers=1", "--config.total_steps=100000"]
    trainer = launch(flags, devices=2)
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and 2 in metrics(workdir)):
            assert trainer.poll() is None, trainer.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.2)
        rings = glob.glob(f"/dev/shm/caip-batches-{trainer.pid}.*")
        # The trainer, its loader worker and multiprocessing's resource tracker.
        assert len(tagged_processes(tag)) >= 3 and len(rings) == 1, (tagged_processes(tag), rings)

        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tagged_processes(tag), "processes of the killed run live on"
        assert not os.path.exists(rings[0]), "the killed run's rings are left in /dev/shm"
    finally:  # whatever failed, nothing of this run may outlive the test
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
        trainer.wait()
