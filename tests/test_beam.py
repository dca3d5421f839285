"""The Beam conversion makes the record set of the single-machine conversion, on worker processes."""
import os

import numpy as np
import pytest
from apache_beam.io.localfilesystem import LocalFileSystem

from caip_jax import actions
from caip_jax.data import convert, records
from caip_jax.data.beam import convert_with_beam
from caip_jax.data.stats import RunningStats
from test_convert import OPTIONS, all_bad, make_records, rigid_episode, write_corrupt, write_npz  # noqa: F401

TWO_PROCESSES = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IN_PROCESS = ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
SHARDS = 3


@pytest.fixture(scope="module")
def npz_input(tmp_path_factory):
    """Five good episodes (one with a NaN pose) and a corrupt file between them."""
    root = str(tmp_path_factory.mktemp("npz"))
    rng = np.random.default_rng(2)
    for i in range(4):
        write_npz(root, f"episode_{i}", **rigid_episode(rng, frames=20 + 4 * i))
    nan_pose = rigid_episode(rng)
    nan_pose["hands"][7, 0, 2] = np.nan
    write_npz(root, "episode_nan", **nan_pose)
    write_corrupt(root, "episode_2_corrupt")
    return root


@pytest.fixture(scope="module")
def single_machine(npz_input, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("single"))
    return output, convert.convert("npz", npz_input, output, OPTIONS, workers=1, shards=SHARDS)


@pytest.fixture(scope="module")
def beam_two_processes(npz_input, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("beam"))
    return output, convert_with_beam("npz", npz_input, output, OPTIONS, {}, SHARDS, TWO_PROCESSES)


def samples(directory):
    """(episode_id, frame_index) -> record bytes, over every shard."""
    out = {}
    for path in records.shard_paths(directory):
        for record in records.read_shard(path):
            sample = records.decode(record)
            out[sample["episode_id"], sample["frame_index"]] = record
    return out


def test_two_processes_write_the_shards_of_the_single_machine(single_machine, beam_two_processes):
    (single, _), (beam_output, _) = single_machine, beam_two_processes
    assert samples(beam_output) == samples(single)
    names = lambda paths: [p.rsplit("/", 1)[1] for p in paths]
    assert names(records.shard_paths(beam_output)) == names(records.shard_paths(single))
    for a, b in zip(records.shard_paths(single), records.shard_paths(beam_output), strict=True):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), b  # same records, same order, same writer options


def test_two_processes_merge_the_statistics_exactly(single_machine, beam_two_processes):
    (single, _), (beam_output, _) = single_machine, beam_two_processes
    expected, got = records.read_json(single, "stats.json"), records.read_json(beam_output, "stats.json")
    assert set(got) == set(actions.DELTAS)
    for delta in actions.DELTAS:
        a, b = RunningStats.from_json(expected[delta]), RunningStats.from_json(got[delta])
        np.testing.assert_array_equal(b.count, a.count)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.std, a.std, rtol=1e-9, atol=1e-12)


def test_the_corrupt_episode_is_counted_and_named_and_the_rest_converts(single_machine, beam_two_processes):
    (_, expected), (beam_output, summary) = single_machine, beam_two_processes
    assert summary == records.read_json(beam_output, "summary.json")
    assert list(summary["failed"]) == ["episode_2_corrupt"] and "cannot read" in summary["failed"]["episode_2_corrupt"]
    for field in ("episodes_listed", "episodes_converted", "episodes_failed", "failed", "records",
                  "bytes_per_record", "invalidated_hand_frames", "warnings", "episodes_with_warnings", "options",
                  "source", "input"):
        assert summary[field] == expected[field], field
    assert summary["episodes_converted"] == 5 and summary["invalidated_hand_frames"] == {"episode_nan": 1}
    assert summary["shard_files"] == SHARDS and summary["episodes_per_second"] > 0
    assert summary["beam"]["pipeline_args"] == TWO_PROCESSES
    assert summary["beam"]["failed_episodes"] == ["episode_2_corrupt"]
    counters = summary["beam"]["counters"]
    assert counters["episodes_failed"] == 1 and counters["episodes_converted"] == 5
    assert counters["records"] == summary["records"] and counters["invalidated_hand_frames"] == 1


def test_more_shards_than_episodes_writes_only_non_empty_shards(npz_input, tmp_path):
    summary = convert_with_beam("npz", npz_input, str(tmp_path), OPTIONS, {}, 16, IN_PROCESS)
    paths = records.shard_paths(str(tmp_path))
    # Sorted keys: episode_0, _1, _2, _2_corrupt, _3, _nan; each good one has a shard of its own.
    assert [p.rsplit("-of-", 1)[0][-5:] for p in paths] == ["00000", "00001", "00002", "00004", "00005"]
    assert sum(len(records.read_shard(p)) for p in paths) == summary["records"]


class RootedFileSystem(LocalFileSystem):
    """testfs://x is ROOT/x: a path that only code going through Beam's FileSystems can write,
    as on gs:// (in this process only, so for the in-process runner)."""

    ROOT = None

    @classmethod
    def scheme(cls):
        return "testfs"

    def _local(self, path):
        return os.path.join(self.ROOT, path.removeprefix("testfs://"))

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *paths])

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])


def test_output_goes_through_beam_file_systems(npz_input, single_machine, tmp_path, monkeypatch):
    monkeypatch.setattr(RootedFileSystem, "ROOT", str(tmp_path))
    summary = convert_with_beam("npz", npz_input, "testfs://out", OPTIONS, {}, SHARDS, IN_PROCESS)
    assert samples(str(tmp_path / "out")) == samples(single_machine[0])
    assert summary == records.read_json(str(tmp_path / "out"), "summary.json")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="found no episodes"):
        convert_with_beam("npz", str(tmp_path), str(tmp_path / "out"), OPTIONS, {}, 2, IN_PROCESS)
    with pytest.raises(ValueError, match="Unknown source 'egodx'"):
        convert_with_beam("egodx", str(tmp_path), str(tmp_path / "out"), OPTIONS, {}, 2, IN_PROCESS)
    with pytest.raises(ValueError, match="at least one shard"):
        convert_with_beam("npz", str(tmp_path), str(tmp_path / "out"), OPTIONS, {}, 0, IN_PROCESS)


@pytest.mark.parametrize("input_name, message", [
    ("all_bad", "ERROR: all 2 episodes failed, none converted"),
    ("npz_input", "ERROR: 1 of 6 episodes (16.7%) failed, more than max_failure_fraction=0.1"),
], ids=["all_failed", "above_the_fraction"])
def test_make_records_on_beam_exits_1_as_on_one_machine(request, tmp_path, input_name, message):
    run = make_records("--source=npz", f"--input={request.getfixturevalue(input_name)}", f"--output={tmp_path}",
                       "--max_failure_fraction=0.1", "--beam", "--", *IN_PROCESS)
    assert run.returncode == 1, run.stderr
    assert message in run.stderr and "_corrupt: cannot read" in run.stderr


def test_warnings_about_defective_files_reach_the_summary(tmp_path):
    """An EgoDex file with empty intrinsics (ml-egodex issue 10) beside a sound one: Beam's
    summary names it with the warning the single-machine conversion gives."""
    from test_egodex import OPTIONS as EGODEX_OPTIONS, write_episode

    write_episode(tmp_path / "in", "part1/a/0")
    defective = write_episode(tmp_path / "in", "part1/a/1", replace={"camera/intrinsic": np.zeros((0, 3))})
    single = convert.convert("egodex", str(tmp_path / "in"), str(tmp_path / "single"), EGODEX_OPTIONS, shards=1)
    summary = convert_with_beam("egodex", str(tmp_path / "in"), str(tmp_path / "beam"), EGODEX_OPTIONS, {}, 1,
                                IN_PROCESS)
    assert summary["warnings"] == single["warnings"] and list(summary["warnings"]) == [defective]
    assert summary["episodes_with_warnings"] == 1 and "camera/intrinsic" in summary["warnings"][defective][0]


def test_beam_writes_the_same_record_set_into_a_bucket(npz_input, single_machine, bucket, monkeypatch):
    """DirectRunner in this process writing gs:// through Beam's GcsIO (the emulator's endpoint).
    The harness's part: Beam's credential search retries for ~40 s before connecting
    anonymously, which the emulator needs anyway, so it is told there are none."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(auth._Credentials, "_get_service_credentials", staticmethod(lambda options: None))
    single, expected = single_machine
    summary = convert_with_beam("npz", npz_input, f"{bucket}/records", OPTIONS, {}, SHARDS, IN_PROCESS)
    assert samples(f"{bucket}/records") == samples(single)
    assert records.read_json(f"{bucket}/records", "summary.json")["records"] == summary["records"] == expected["records"]
    assert records.read_json(f"{bucket}/records", "stats.json") == records.read_json(single, "stats.json")
    assert not os.path.exists("gs:")
