"""The demo world end to end on one machine: records, a tokenizer, training."""
import json
import os

import ml_collections

from caip_jax import train
from caip_jax.data import convert, tokenizer
from caip_jax.data.sources import demo_world


def make_data(directory: str, num_episodes: int, horizon: int, seed: int = 0, workers: int = 2) -> tuple[str, str]:
    """Demo-world records and a sentencepiece tokenizer for its instructions, made once.
    -> (records directory, tokenizer path)."""
    records_dir = os.path.join(directory, "records")
    spm = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(os.path.join(records_dir, "summary.json")):
        options = convert.ConvertOptions(horizon=horizon, stride=4, jpeg_short_side=96)
        source_options = dict(num_episodes=num_episodes, seed=seed, image_size=96)
        convert.convert("demo_world", "", records_dir, options, source_options, workers=workers, shards=4)
    if not os.path.exists(spm):
        texts = [
            f"{verb} the {colour} {shape} with the {hand} hand"
            for verb in demo_world.VERBS
            for colour in demo_world.COLOURS
            for shape in demo_world.SHAPES
            for hand in ("left", "right")
        ]
        tokenizer.train_sentencepiece(texts * 4, spm, vocab_size=1000)
    return records_dir, spm


def run(config: ml_collections.ConfigDict, workdir: str, num_episodes: int = 160) -> list[dict]:
    """Makes the demo data under `workdir`/data (once), trains `config` in `workdir`/train and
    returns the metrics logged there (metrics.jsonl), oldest first."""
    records_dir, spm = make_data(os.path.join(workdir, "data"), num_episodes, config.model.action.horizon, config.seed)
    config = config.copy_and_resolve_references()
    config.data.train, config.data.tokenizer = records_dir, spm
    train.train(config, os.path.join(workdir, "train"))
    with open(os.path.join(workdir, "train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
