"""Episodes -> record sets on Apache Beam: the record set of `convert.convert`, made by the worker
processes of one machine (DirectRunner) or by a cluster (Dataflow, Flink, Spark), chosen by
ordinary Beam pipeline options. Each episode goes through `convert.read_and_convert`, the one
conversion there is.

    launcher   keys = source.list_episodes(...)  ->  Create([(number, key), ...])
    Convert    read_and_convert(key)  ->  (number, EpisodeResult | (key, reason))
      | by shard: number % shards -> GroupByKey -> WriteShard (episode order, then anchor order)
      | CombineGlobally(SummaryFn): counts, failures by name, RunningStats.merge of statistics
    Finish     stats.json, summary.json, once every shard is written (shards as a side input)
    launcher   adds the wall time, runner and counters to summary.json

The output depends on the episodes only, never on the runner or the number of workers: shards
are byte-identical to those of `convert.convert` with the same `shards`; statistics equal them up
to the rounding of a different merge order.

Limits, by design: a shard's records sit in one worker's memory while it is written (choose
`shards` so that a shard is at most a few hundred MB, and at least as many shards as workers for
parallel writes); the key list travels inside the pipeline graph (Dataflow caps a job graph at
10 MB: some 100k keys); sources read `input_path` with local file APIs, so on a cluster the
input must be on a file system that the launcher and every worker mount (demo_world needs none).
The output directory may be anywhere Beam's FileSystems write (gs://... with apache-beam[gcp]).
"""
import dataclasses
import functools
import json
import logging
import operator
import os
import shutil
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability import fn_api_runner
from apache_beam.runners.runner import PipelineState
from array_record.python import array_record_module

from caip_jax import storage
from caip_jax.data import convert, records
from caip_jax.data.convert import ConvertOptions

NAMESPACE = "caip"  # of the Beam metrics below

_converted = Metrics.counter(NAMESPACE, "episodes_converted")
_failed = Metrics.counter(NAMESPACE, "episodes_failed")
_failed_names = Metrics.string_set(NAMESPACE, "failed_episodes")
_records = Metrics.counter(NAMESPACE, "records")
_invalidated = Metrics.counter(NAMESPACE, "invalidated_hand_frames")


class ConvertEpisode(beam.DoFn):
    """(number, key) -> (number, EpisodeResult), or (number, (key, reason)) for an episode that
    failed: failures flow on to the summary, which names them, and never stop the pipeline."""

    def __init__(self, source: str, input_path: str, source_options: dict, options: ConvertOptions):
        self._args = (source, input_path, source_options, options)

    def process(self, element):
        number, key = element
        result = convert.read_and_convert(*self._args, key)
        if isinstance(result, convert.EpisodeResult):
            _converted.inc()
            _records.inc(len(result.records))
            _invalidated.inc(result.invalidated_hand_frames)
        else:
            _failed.inc()
            _failed_names.add(key)
            logging.warning("episode %s skipped: %s", *result)
        yield number, result


def by_shard(element, shards: int):
    """(number, result) -> (shard, (number, records)) of a converted episode; round-robin by
    episode number, as records.ShardWriter assigns them."""
    number, result = element
    if isinstance(result, convert.EpisodeResult):
        yield number % shards, (number, result.records)


class WriteShard(beam.DoFn):
    """(shard, [(number, records), ...]) -> (path, record count): one ArrayRecord shard, its
    episodes in number order. ArrayRecord writes local files only, so the shard is written to a
    local temporary file and copied to `output_dir` through Beam's FileSystems (any path Beam
    can write: local, gs://, s3://...). A retried bundle rewrites the same bytes."""

    def __init__(self, output_dir: str, shards: int):
        self._output_dir, self._shards = output_dir, shards

    def process(self, element):
        shard, episodes = element
        name = records.SHARD_PATTERN.format(index=shard, count=self._shards)
        path = FileSystems.join(self._output_dir, name)
        with tempfile.TemporaryDirectory() as local:
            local_path = os.path.join(local, name)
            writer = array_record_module.ArrayRecordWriter(local_path, records.WRITER_OPTIONS)
            count = 0
            for _, episode_records in sorted(episodes, key=operator.itemgetter(0)):
                for record in episode_records:
                    writer.write(record)
                count += len(episode_records)
            writer.close()
            # Every converted episode has at least one record, so a shard that exists is never
            # empty (empty shards, which ArrayRecord readers cannot open, get no file at all).
            with open(local_path, "rb") as source, _create(path) as target:
                shutil.copyfileobj(source, target, 16 << 20)
        yield path, count


class SummaryFn(beam.CombineFn):
    """Episode results -> one `convert.Summary`: counts, failures by name, invalidated
    hand-frames, and statistics merged with RunningStats.merge (exact parallel mean/variance).
    Runners add inputs where the results are made, so records never cross the network here."""

    def create_accumulator(self) -> convert.Summary:
        return convert.Summary()

    def add_input(self, summary: convert.Summary, element) -> convert.Summary:
        summary.add(element[1])
        return summary

    def merge_accumulators(self, summaries) -> convert.Summary:
        return merge_summaries(summaries)

    def extract_output(self, summary: convert.Summary) -> convert.Summary:
        return summary


def merge_summaries(summaries) -> convert.Summary:
    """The Summary of the episodes of all `summaries` (which hold disjoint episodes)."""
    return functools.reduce(convert.Summary.merge, summaries, convert.Summary())


def finish(summary: convert.Summary, output_dir: str, metadata: dict, written: list) -> None:
    """Writes stats.json and summary.json; `written` (the shards' (path, count), a side input)
    makes this wait until every shard is in place, so a summary means a complete record set."""
    write_json(output_dir, "stats.json", {delta: s.to_json() for delta, s in summary.stats.items()})
    write_json(output_dir, "summary.json", summary.to_json(**metadata, shard_files=len(written)))


def build(pipeline: beam.Pipeline, keys: list[str], source: str, input_path: str, output_dir: str,
          options: ConvertOptions, source_options: dict, shards: int) -> None:
    """Adds the conversion of the sorted `keys` to `pipeline` (see the module docstring)."""
    metadata = dict(
        source=source,
        input=input_path,
        options=dataclasses.asdict(options),
        source_options=source_options,
        episodes_listed=len(keys),
    )
    results = (
        pipeline
        | "Keys" >> beam.Create(list(enumerate(keys)))  # reshuffled: episodes spread over workers
        | "Convert" >> beam.ParDo(ConvertEpisode(source, input_path, source_options, options))
    )
    written = (
        results
        | "ByShard" >> beam.FlatMap(by_shard, shards)
        | "GroupShards" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShard(output_dir, shards))
    )
    (
        results
        | "Summarise" >> beam.CombineGlobally(SummaryFn())
        | "Finish" >> beam.Map(finish, output_dir, metadata, beam.pvalue.AsList(written))
    )


def _local_runner(pipeline_options: PipelineOptions):
    """For DirectRunner (the default), Beam's FnApiRunner itself, which honours
    --direct_num_workers and --direct_running_mode. Beam 2.77's DirectRunner would first try
    Prism, which downloads its binary from GitHub at run time, then fall back to the same
    FnApiRunner. Other runners (Dataflow, Flink, Spark) are left to Beam: None."""
    if (pipeline_options.view_as(StandardOptions).runner or "DirectRunner") != "DirectRunner":
        return None
    return fn_api_runner.FnApiRunner()


def convert_with_beam(
    source: str,
    input_path: str,
    output_dir: str,
    options: ConvertOptions = ConvertOptions(),
    source_options: dict | None = None,
    shards: int = 8,
    pipeline_args: list[str] | None = None,
) -> dict:
    """Converts every episode of `source` under `input_path` into a record set in `output_dir`
    (a local path or any URL Beam's FileSystems writes, e.g. gs://...) on the Beam runner that
    `pipeline_args` name (default: DirectRunner in this process), and waits for it.

    Returns summary.json: the fields of `convert.Summary.to_json`, plus `shard_files` and
    `beam` (runner, pipeline_args, the caip counters).
    """
    if shards < 1:
        raise ValueError(f"shards={shards}: need at least one shard")
    source_options = source_options or {}
    pipeline_args = list(pipeline_args or [])
    keys = convert.list_keys(source, input_path, source_options)
    pipeline_options = PipelineOptions(pipeline_args)
    start = time.time()
    pipeline = beam.Pipeline(runner=_local_runner(pipeline_options), options=pipeline_options)
    build(pipeline, keys, source, input_path, output_dir, options, source_options, shards)
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise RuntimeError(f"Beam pipeline ended {state}, not DONE: {output_dir!r} is incomplete")
    elapsed = time.time() - start
    summary = read_json(output_dir, "summary.json")
    summary.update(
        seconds=elapsed,
        episodes_per_second=len(keys) / elapsed,
        beam=dict(
            runner=pipeline_options.view_as(StandardOptions).runner or "DirectRunner",
            pipeline_args=pipeline_args,
            **metric_results(result),
        ),
    )
    write_json(output_dir, "summary.json", summary)
    return summary


def metric_results(result) -> dict:
    """The caip counters (name -> int) and failed episode names of a finished pipeline, as far
    as its runner reports them (committed where it can, else attempted)."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {}
    for metric in metrics["counters"]:
        counters[metric.key.metric.name] = counters.get(metric.key.metric.name, 0) + metric.result
    names = set()
    for metric in metrics.get("string_sets", []):
        names |= set(metric.result or ())
    return dict(counters=counters, failed_episodes=sorted(names))


def _create(path: str):
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def write_json(directory: str, name: str, content: dict) -> None:
    """records.write_json through FileSystems (any Beam path), so that a reader never sees half a
    file: a local file is written beside, then renamed; an object upload is all-or-nothing
    already (and a rename on object storage is a copy and a delete)."""
    path = FileSystems.join(directory, name)
    partial = path if storage.is_remote(path) else path + ".tmp"
    with _create(partial) as f:
        f.write(json.dumps(content, indent=1, sort_keys=True).encode())
    if partial != path:
        FileSystems.rename([partial], [path])


def read_json(directory: str, name: str) -> dict:
    with FileSystems.open(FileSystems.join(directory, name), compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.load(f)
