"""The shared-memory ring that carries batches from loader processes: every batch arrives
intact and owned by the trainer, a slot is never overwritten before it is taken, grain's
worker processes and mid-run restores go through it, and it leaves nothing behind."""
import gc
import os
import threading

import numpy as np

from caip_jax.data import batch_ring, pipeline
from test_pipeline import make_preprocess


def random_batch(rng, rows: int = 4) -> dict:
    return dict(
        image=rng.integers(0, 256, (rows, 5, 7, 3), dtype=np.uint8),
        translation=rng.integers(-2**15, 2**15, (rows, 3, 2, 21, 3), dtype=np.int16),
        jitter=rng.normal(size=(rows, 3)).astype(np.float32),
        valid=rng.random((rows, 4, 2)) < 0.5,
        episode_id=np.array([f"episode {i}" for i in rng.integers(0, 99, rows)]),  # not numeric
        labels={"hand": ["left"] * rows},  # not an array
    )


def assert_batches_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


def new_ring(tmp_path):
    """A writer and a reader of rings in a fresh directory (a worker and the trainer, here in
    one process), and the directory."""
    directory = str(tmp_path / "rings")
    os.makedirs(directory)
    return batch_ring.RingWriter(directory), batch_ring.RingReader(directory), directory


def test_batches_come_back_intact_and_owned_by_the_reader(tmp_path):
    writer, reader, _ = new_ring(tmp_path)
    rng = np.random.default_rng(0)
    sent = [random_batch(rng) for _ in range(3 * batch_ring.SLOTS)]
    # All kept until the end: each slot has been written three times since its first batch.
    received = [reader(writer(batch)) for batch in sent]
    for got, expected in zip(received, sent):
        assert_batches_equal(got, expected)


def test_a_batch_larger_than_the_slots_goes_through_unchanged(tmp_path):
    writer, reader, _ = new_ring(tmp_path)
    rng = np.random.default_rng(1)
    small, large = random_batch(rng, rows=2), random_batch(rng, rows=400)  # slots are whole pages
    assert isinstance(writer(small), batch_ring.RingBatch)
    message = writer(large)
    assert message is large
    assert_batches_equal(reader(message), large)


def test_a_slot_is_not_overwritten_before_it_is_taken(tmp_path):
    writer, reader, _ = new_ring(tmp_path)
    rng = np.random.default_rng(2)
    sent = [random_batch(rng) for _ in range(batch_ring.SLOTS + 1)]
    messages = [writer(batch) for batch in sent[:-1]]  # every slot full, none taken
    late = []
    blocked = threading.Thread(target=lambda: late.append(writer(sent[-1])))
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive(), "the writer reused the slot of a batch nobody took"
    assert_batches_equal(reader(messages[0]), sent[0])  # still intact; this frees its slot
    blocked.join(timeout=10)
    assert not blocked.is_alive()
    for message, expected in zip(messages[1:] + late, sent[1:]):
        assert_batches_equal(reader(message), expected)


def test_the_reader_removes_the_rings_when_collected(tmp_path):
    writer, reader, directory = new_ring(tmp_path)
    reader(writer(random_batch(np.random.default_rng(3))))
    assert len(os.listdir(directory)) == 1
    del reader
    gc.collect()
    assert not os.path.exists(directory)


def test_worker_processes_restore_mid_run_through_the_ring(record_set):
    """More batches than a worker's ring holds, kept while later ones arrive, equal to the
    in-process ones; then a restore to an earlier state while batches are in flight."""
    preprocess = make_preprocess(record_set)
    batches = pipeline.train_batches([(record_set[0], preprocess, 1.0)], 4, seed=5)
    count = 4 * batch_ring.SLOTS + 3  # each of the 2 workers wraps its ring twice
    in_process = pipeline.iterate(batches)
    expected = [next(in_process) for _ in range(count)]
    state = None
    with_workers = pipeline.iterate(batches, workers=2)
    kept = []
    for step in range(count):
        if step == 5:
            state = with_workers.get_state()
        kept.append(next(with_workers))
    for got, want in zip(kept, expected):
        assert_batches_equal(got, want)
    with_workers.set_state(state)  # the workers have batches in flight: they are dropped
    for step in range(5, 5 + 2 * batch_ring.SLOTS):
        assert_batches_equal(next(with_workers), expected[step])
    with_workers.close()


def test_worker_processes_carry_the_metadata_of_evaluation_batches(record_set):
    preprocess = make_preprocess(record_set, with_metadata=True)
    batches = pipeline.eval_samples(record_set[0], preprocess).batch(5)
    in_process = list(pipeline.iterate(batches))
    with_worker = list(pipeline.iterate(batches, workers=1))
    assert len(with_worker) == len(in_process) == 4  # 18 records, the last batch short
    for got, want in zip(with_worker, in_process):
        assert_batches_equal(got, want)
