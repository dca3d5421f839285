"""A record set as a TensorFlow Datasets dataset (`caip_records`), for users of the TFDS
catalogue: `tfds.data_source("caip_records", data_dir=...)` opens it, without TensorFlow, and the
grain pipeline and training read its version directory like a record set (with the record
set's stats.json copied beside it).

The features are the sample fields of records.py; the image is stored as the same JPEG bytes,
`labels` (free-form keys) as JSON text.
"""
import functools
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from caip_jax.data import records

NAME = "caip_records"


class CaipRecords(tfds.core.GeneratorBasedBuilder):
    """CAIP samples: anchor frame, instruction, the T+1 compressed camera-frame hand poses."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the record set directory (from caip-make-records) as manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        pose = lambda dtype, *shape: tfds.features.Tensor(shape=shape, dtype=dtype)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                dict(
                    image=tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    text=tfds.features.Text(),
                    poses=tfds.features.FeaturesDict(
                        dict(
                            anchor_translation=pose(np.float32, 2, 21, 3),
                            anchor_quaternion=pose(np.float32, 2, 21, 4),
                            translation=pose(np.int16, None, 2, 21, 3),
                            translation_scale=pose(np.float32, 1),
                            rotation=pose(np.int16, None, 2, 21, 3),
                        )
                    ),
                    valid=pose(np.bool_, None, 2),
                    source=tfds.features.Text(),
                    episode_id=tfds.features.Text(),
                    view=tfds.features.Text(),
                    frame_index=np.int64,
                    intrinsics=pose(np.float32, 3, 3),
                    labels=tfds.features.Text(),
                )
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, directory: str):
        for path in records.open_set(directory).shards:  # a damaged record set is refused by name
            for record in records.read_shard(path):
                sample = records.decode(record)
                key = f"{sample['source']}/{sample['episode_id']}/{sample['view']}/{sample['frame_index']}"
                yield key, dict(sample, labels=json.dumps(sample["labels"], sort_keys=True))


def build(records_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """Writes the record set in `records_dir` as the TFDS dataset `caip_records` in `data_dir`."""
    builder = CaipRecords(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=records_dir))
    # Beside the TFDS files, so that training on this directory finds the action statistics.
    records.write_json(str(builder.data_dir), "stats.json", records.read_json(records_dir, "stats.json"))
    return builder


def open_set(version_dir: str, missing_shards: str = "error") -> records.RecordSet:
    """The TFDS form's shards, verified as `records.verify` does: each opens and holds the
    records its dataset_info.json counts."""
    split = tfds.builder_from_directory(version_dir).info.splits["train"]
    shards = [(os.fspath(f.filename), f.examples_in_shard) for f in split.file_instructions]
    return records.verify(version_dir, shards, [], split.num_examples, "dataset_info.json", missing_shards)


def decoder(version_dir: str):
    """serialized TFDS example (bytes) -> the sample dict of records.py (the image decoded), as
    a picklable function."""
    return functools.partial(_decode, tfds.builder_from_directory(version_dir).info.features)


def _decode(features: tfds.features.FeaturesDict, serialized: bytes) -> dict:
    example = features.deserialize_example_np(serialized)
    text = {key: example[key].decode() for key in ("text", "source", "episode_id", "view")}
    return dict(example, **text, labels=json.loads(example["labels"]))
