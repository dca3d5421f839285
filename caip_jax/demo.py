"""The demo world end to end on one machine: records and a tokenizer, training, evaluation
(linear probes and retrieval against the random-init baseline, saliency maps) and the PyTorch
export."""
import json
import os

import ml_collections

from caip_jax import train
from caip_jax.data import convert, inspect, records, tokenizer
from caip_jax.data.sources import demo_world
from caip_jax.evaluate import features, linear_probe, saliency
from caip_jax.export import hf_dir

TEST_SEED_OFFSET = 1000  # held-out episodes: another seed of the generator


def make_records(directory: str, num_episodes: int, horizon: int, seed: int, workers: int = 2) -> str:
    """Demo-world records of `num_episodes` episodes in `directory`, made once."""
    if not os.path.exists(os.path.join(directory, "summary.json")):
        options = convert.ConvertOptions(horizon=horizon, stride=4, jpeg_short_side=96)
        source_options = dict(num_episodes=num_episodes, seed=seed, image_size=96)
        convert.convert("demo_world", "", directory, options, source_options, workers=workers, shards=4)
    return directory


def make_tokenizer(path: str) -> str:
    """A sentencepiece model for every instruction the demo world can say, made once."""
    if not os.path.exists(path):
        texts = [
            f"{verb} the {colour} {shape} with the {hand} hand"
            for verb in demo_world.VERBS
            for colour in demo_world.COLOURS
            for shape in demo_world.SHAPES
            for hand in ("left", "right")
        ]
        tokenizer.train_sentencepiece(texts * 4, path, vocab_size=1000)
    return path


def run(config: ml_collections.ConfigDict, workdir: str, num_episodes: int = 160, test_episodes: int = 48) -> dict:
    """Makes the demo data under `workdir`/data (once), trains `config` in `workdir`/train,
    evaluates it on held-out episodes (`workdir`/train/probe, `workdir`/train/saliency) and
    exports it to `workdir`/hf. -> dict(metrics: logged metrics oldest first, report: the
    probe report, export: what was exported)."""
    data = os.path.join(workdir, "data")
    horizon = config.model.action.horizon
    train_records = make_records(os.path.join(data, "records"), num_episodes, horizon, config.seed)
    test_records = make_records(os.path.join(data, "test_records"), test_episodes, horizon, config.seed + TEST_SEED_OFFSET)
    config = config.copy_and_resolve_references()
    config.data.train, config.data.tokenizer = train_records, make_tokenizer(os.path.join(data, "tokenizer.model"))
    run_dir = os.path.join(workdir, "train")
    train.train(config, run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]

    trained = features.from_checkpoint(run_dir)
    baseline = features.initialised(trained.config, seed=config.seed + 1)
    report = linear_probe.evaluate([trained, baseline], train_records, test_records, batch_size=config.batch_size)
    linear_probe.write(report, os.path.join(run_dir, "probe"), "CAIP on the demo world")
    samples = [records.decode(r) for r in inspect.spread_records(test_records, 8)]
    texts = [s["text"] for s in samples]
    tiles = features.saliency_tiles(trained, [s["image"] for s in samples], texts)
    saliency.save_png(saliency.contact_sheet(tiles, texts), os.path.join(run_dir, "saliency", "sheet.png"))
    exported = hf_dir.export(run_dir, os.path.join(workdir, "hf"))
    return dict(metrics=logged, report=report, export=exported)
