"""The grain pipeline: the same global batches for any process or worker count, exact resume,
preprocessing against independent computations, corrupt records skipped by name."""
import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from caip_jax.data import pipeline, records, tokenizer
from caip_jax.data.stats import RunningStats
from test_convert import OPTIONS

TEXT_LEN, IMAGE_SIZE = 8, 16  # the record_set fixture (conftest.py) holds 18 samples


def make_preprocess(record_set, **kwargs):
    return pipeline.Preprocess(record_set[1], IMAGE_SIZE, TEXT_LEN, OPTIONS.horizon, **kwargs)


@pytest.mark.parametrize("processes", [2, 3, 6])
def test_global_batches_do_not_depend_on_the_process_count(record_set, processes):
    preprocess = make_preprocess(record_set)
    sources = [(record_set[0], preprocess, 1.0)]
    single = pipeline.train_batches(sources, 6, seed=3)
    parts = [pipeline.train_batches(sources, 6, 3, p, processes) for p in range(processes)]
    for step in (0, 1, 5):  # 18 records: step 5 is in the third epoch, reshuffled
        for key in ("image", "jitter", "text", "translation", "valid"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), single[step][key])


def test_epochs_are_reshuffled_permutations(record_set):
    preprocess = make_preprocess(record_set, with_metadata=True)
    batches = pipeline.train_batches([(record_set[0], preprocess, 1.0)], 6, seed=3)
    epochs = [[(e, f) for k in range(3 * i, 3 * i + 3) for e, f in zip(batches[k]["episode_id"], batches[k]["frame_index"])] for i in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 18
    assert epochs[0] != epochs[1]


def test_workers_and_resume_give_the_same_batches(record_set):
    preprocess = make_preprocess(record_set)
    batches = pipeline.train_batches([(record_set[0], preprocess, 1.0)], 4, seed=0)
    in_process = pipeline.iterate(batches)
    first = [next(in_process) for _ in range(3)]
    state = in_process.get_state()
    expected = next(in_process)

    with_workers = pipeline.iterate(batches, workers=2)
    for batch in first:
        np.testing.assert_array_equal(next(with_workers)["image"], batch["image"])
    with_workers.close()

    resumed = pipeline.iterate(batches)
    resumed.set_state(state)
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_evaluation_preprocessing_matches_an_independent_computation(record_set):
    directory, spm = record_set
    preprocess = make_preprocess(record_set)
    sample = records.decode(records.read_shard(records.shard_paths(directory)[0])[0])
    out = pipeline.eval_samples(directory, preprocess)[0]

    pixels = Image.open(io.BytesIO(sample["image"])).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    np.testing.assert_array_equal(out["image"], np.asarray(pixels))
    np.testing.assert_array_equal(out["jitter"], np.ones(3))
    np.testing.assert_array_equal(out["text"], tokenizer.Tokenizer(spm, TEXT_LEN).encode([sample["text"]])[0])
    for key in ("translation", "rotation", "translation_scale"):
        np.testing.assert_array_equal(out[key], sample["poses"][key][: OPTIONS.horizon] if key != "translation_scale" else sample["poses"][key])
    np.testing.assert_array_equal(out["valid"], sample["valid"])


def test_augmentation_is_seeded_and_changes_only_the_image(record_set):
    preprocess = make_preprocess(record_set)
    sample = records.decode(records.read_shard(records.shard_paths(record_set[0])[0])[1])
    gradient = (np.indices((40, 48)).sum(0) * 2).astype(np.uint8)  # so that a crop shows
    jpeg = io.BytesIO()
    Image.fromarray(np.stack([gradient] * 3, -1)).save(jpeg, "JPEG", quality=95)
    record = records.encode(dict(sample, image=jpeg.getvalue()))
    plain = preprocess(record)
    first, again = (preprocess(record, np.random.default_rng(7)) for _ in range(2))
    other = preprocess(record, np.random.default_rng(8))
    for key in ("image", "jitter"):
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], plain[key]) and not np.array_equal(first[key], other[key])
    assert first["image"].dtype == np.uint8 and first["image"].shape == plain["image"].shape
    assert np.all(np.abs(first["jitter"] - 1) <= 0.2)
    for key in ("text", "translation", "rotation", "valid"):
        np.testing.assert_array_equal(first[key], plain[key])


def test_a_corrupt_record_is_skipped_and_named(record_set, tmp_path, caplog):
    directory, _ = record_set
    samples = [r for path in records.shard_paths(directory) for r in records.read_shard(path)]
    broken = records.decode(samples[1])
    broken["image"] = broken["image"][:40]  # a truncated JPEG
    samples[1] = records.encode(broken)
    writer = records.ShardWriter(str(tmp_path), 1)
    writer.write_episode(0, samples)
    writer.close()
    preprocess = make_preprocess(record_set, with_metadata=True)
    with caplog.at_level(logging.ERROR):
        replaced = pipeline.eval_samples(str(tmp_path), preprocess)[1]
    assert f"{broken['episode_id']} frame {broken['frame_index']}" in caplog.text
    assert replaced["frame_index"] == records.decode(samples[2])["frame_index"]


def test_a_set_of_corrupt_records_stops_with_a_clear_error(record_set, tmp_path):
    directory, _ = record_set
    samples = [records.decode(r) for path in records.shard_paths(directory) for r in records.read_shard(path)]
    writer = records.ShardWriter(str(tmp_path), 1)
    writer.write_episode(0, [records.encode(dict(s, image=s["image"][:40])) for s in samples])
    writer.close()
    with pytest.raises(RuntimeError, match="16 records in a row from stream index 3 failed") as error:
        pipeline.eval_samples(str(tmp_path), make_preprocess(record_set))[3]
    assert error.value.__cause__ is not None  # the last record's own error, for the traceback


def test_records_too_short_for_the_horizon_are_a_config_error(record_set):
    directory, spm = record_set
    preprocess = pipeline.Preprocess(spm, IMAGE_SIZE, TEXT_LEN, horizon=OPTIONS.horizon + 1)
    with pytest.raises(pipeline.DataConfigError, match="horizon=9"):
        pipeline.eval_samples(directory, preprocess)[0]


def test_the_tfds_form_opens_with_tfds_and_feeds_the_same_samples(record_set, tmp_path):
    import tensorflow_datasets as tfds

    from caip_jax.data import tfds_builder

    directory, _ = record_set
    tfds_builder.build(directory, str(tmp_path))
    source = tfds.data_source(tfds_builder.NAME, data_dir=str(tmp_path), split="train")
    assert len(source) == 18
    preprocess = make_preprocess(record_set, with_metadata=True)
    ours = {(s["episode_id"], s["frame_index"]): s for s in pipeline.eval_samples(directory, preprocess)}
    version_dir = str(tmp_path / tfds_builder.NAME / "1.0.0")
    assert records.read_json(version_dir, "stats.json") == records.read_json(directory, "stats.json")
    theirs = list(pipeline.eval_samples(version_dir, preprocess))
    assert {(s["episode_id"], s["frame_index"]) for s in theirs} == set(ours)
    for sample in theirs:
        expected = ours[(sample["episode_id"], sample["frame_index"])]
        for key in ("image", "text", "translation", "rotation", "valid"):
            np.testing.assert_array_equal(sample[key], expected[key])


def test_metadata_carries_each_episodes_labels(record_set, tmp_path):
    """The demo world's labels are its episode spec's (target, hand, verb); npz episodes have
    none. The TFDS form gives the same."""
    from caip_jax.data import convert, tfds_builder
    from caip_jax.data.sources import demo_world

    preprocess = make_preprocess(record_set, with_metadata=True)
    assert all(s["labels"] == {} for s in pipeline.eval_samples(record_set[0], preprocess))

    directory = str(tmp_path / "demo")
    source_options = dict(num_episodes=3, image_size=32, num_frames=24)
    convert.convert("demo_world", "", directory, OPTIONS, source_options, shards=1)
    samples = list(pipeline.eval_samples(directory, preprocess))
    for sample in samples:
        labels = demo_world.episode_spec(*demo_world.parse_key(sample["episode_id"])).labels
        assert sample["labels"] == labels and set(labels) == {"target", "hand", "verb"}
    assert len({tuple(sorted(s["labels"].items())) for s in samples}) > 1

    tfds_builder.build(directory, str(tmp_path / "tfds"))
    version_dir = str(tmp_path / "tfds" / tfds_builder.NAME / "1.0.0")
    theirs = {(s["episode_id"], s["frame_index"]): s["labels"] for s in pipeline.eval_samples(version_dir, preprocess)}
    assert theirs == {(s["episode_id"], s["frame_index"]): s["labels"] for s in samples}


def test_data_train_names_one_set_or_a_weighted_mixture():
    assert pipeline.parse_sources("gs://bucket/records") == [pipeline.Source("train", "gs://bucket/records")]
    assert pipeline.parse_sources("lab:0.3:/data/lab, wild:0.7:gs://b/wild") == [
        pipeline.Source("lab", "/data/lab", 0.3),
        pipeline.Source("wild", "gs://b/wild", 0.7),
    ]
    for bad in ("lab:0.3:/a,/b", "lab:0:/a,wild:1:/b", "lab:1:/a,lab:1:/b", ""):
        with pytest.raises(pipeline.DataConfigError, match="data.train"):
            pipeline.parse_sources(bad)


@pytest.fixture(scope="module")
def mixture(record_set, tmp_path_factory):
    """Three sources of very different sizes: 18 records, 3 records, 18 records."""
    directory, _ = record_set
    small = str(tmp_path_factory.mktemp("small"))
    writer = records.ShardWriter(small, 1)
    writer.write_episode(0, records.read_shard(records.shard_paths(directory)[0])[:3])
    writer.close()
    shutil.copy(os.path.join(directory, "stats.json"), small)
    preprocess = make_preprocess(record_set)
    weights = (0.3, 0.65, 0.05)
    return [(path, preprocess, w) for path, w in zip((directory, small, directory), weights)]


def test_mixture_shares_follow_the_weights_not_the_sizes(mixture):
    batches = pipeline.train_batches(mixture, 20, seed=0)
    source = np.concatenate([batches[k]["source_index"] for k in range(50)])  # 1000 samples
    for index, (_, _, weight) in enumerate(mixture):
        share = np.mean(source == index)
        # Binomial 4-sigma bound; grain's mix interleaves deterministically, well inside it.
        assert abs(share - weight) < 4 * np.sqrt(weight * (1 - weight) / len(source)), (index, share)


def test_mixture_batches_do_not_depend_on_processes_or_workers_and_resume_exactly(mixture):
    single = pipeline.train_batches(mixture, 6, seed=1)
    halves = [pipeline.train_batches(mixture, 6, 1, p, 2) for p in range(2)]
    for step in (0, 7):  # step 7 is past the small source's third repetition
        for key in ("image", "text", "translation", "source_index"):
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), single[step][key])
    iterator = pipeline.iterate(single)
    with_workers = pipeline.iterate(single, workers=2)
    for _ in range(4):
        np.testing.assert_array_equal(next(with_workers)["text"], next(iterator)["text"])
    with_workers.close()
    state, expected = iterator.get_state(), next(iterator)
    resumed = pipeline.iterate(single)
    resumed.set_state(state)
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_mixture_stats_are_those_of_the_weighted_union():
    """Weights 1:3 over two equal-count sets equal numpy over A, B, B, B."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (2, 40, 8, 2, 21, 9))
    mask = np.ones((40, 8, 2), bool)
    stats = [{"anchor": RunningStats.of_batch(x, mask).to_json()} for x in (a, b)]
    mixed = pipeline.mixture_stats(stats, [0.25, 0.75])["anchor"]
    union = np.concatenate([a, b, b, b])
    np.testing.assert_allclose(mixed["mean"], union.mean(axis=(0, 1)), rtol=1e-10)
    np.testing.assert_allclose(mixed["std"], union.std(axis=(0, 1)), rtol=1e-10)
