"""The README's pod workflow with every path on object storage (a GCS emulator on 127.0.0.1):
records made into a bucket, training from them with a gs:// tokenizer and workdir, preempted,
killed and resumed, a damaged step, export, probes and saliency; each compared with the same work
on local disk, which it must equal. And what a pod user gets wrong: a bucket's typo, no
credentials, a read-only bucket: one line naming the path and the fix, within seconds."""
import io
import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

import tiny_run_config
from caip_jax import storage, train
from caip_jax.checkpoint import Checkpoints
from caip_jax.data import convert, records
from caip_jax.evaluate import features, linear_probe
from caip_jax.export import hf_dir
from gcs import CLOSED_PORT, Proxy
from test_convert import OPTIONS
from test_train import config_flags, final_params, launch, run_config, wait_for

EVERY, STEPS = 2, 6


def finished(process, status=0) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == status, out[-3000:]
    return out


def gs_metrics(workdir: str) -> dict:
    return {m["step"]: m for m in map(json.loads, storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines())}


def no_local_gs_folder(*directories):
    for directory in directories:
        assert not os.path.exists(os.path.join(directory, "gs:")), f"a local folder gs: was made in {directory}"


@pytest.fixture(scope="module")
def runs(record_set, gcs, tmp_path_factory):
    """The same 6-step run twice: on local disk (straight), and with records, tokenizer and workdir
    in a bucket, preempted by SIGTERM after its first checkpoint, then SIGKILLed after its second,
    then finished. Returns (bucket, local config, local workdir, gs config, gs workdir, cwd)."""
    bucket = gcs.create_bucket("pod-run")
    records_dir, tokenizer = record_set
    cwd = str(tmp_path_factory.mktemp("cwd"))  # where a path mistaken for local would appear

    # caip-make-records into the bucket: the same converter as the local set, same episodes.
    convert.convert("npz", os.path.join(os.path.dirname(records_dir), "npz"), f"{bucket}/records", OPTIONS, shards=2)
    storage.write_bytes(f"{bucket}/tokenizer/spm.model", storage.read_bytes(tokenizer))

    local = run_config(record_set)
    local.checkpoint.every_steps, local.total_steps = EVERY, STEPS
    local_workdir = str(tmp_path_factory.mktemp("local") / "run")
    train.train(local, local_workdir)

    remote = run_config((f"{bucket}/records", f"{bucket}/tokenizer/spm.model"))
    remote.checkpoint.every_steps, remote.total_steps = EVERY, STEPS
    workdir = f"{bucket}/runs/tiny"
    flags = config_flags(remote, workdir) + [f"--config.checkpoint.every_steps={EVERY}"]
    step_written = lambda step: os.path.isdir(gcs.local_path(f"{workdir}/checkpoints/{step}"))

    process = launch(flags, devices=8, cwd=cwd)
    wait_for(lambda: step_written(EVERY) or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    finished(process, train.PREEMPTED_EXIT_CODE)
    preempted_at = Checkpoints(workdir).latest_step()
    # GCS cannot append: metrics.jsonl is uploaded whole, and at exit, so none of it is lost.
    assert sorted(gs_metrics(workdir)) == list(range(1, preempted_at + 1))

    process = launch(flags, devices=8, cwd=cwd)
    wait_for(lambda: step_written(preempted_at - preempted_at % EVERY + EVERY) or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    finished(launch(flags, devices=8, cwd=cwd))
    return bucket, local, local_workdir, remote, workdir, cwd


def test_make_records_writes_the_record_set_into_the_bucket(record_set, runs, gcs):
    bucket = runs[0]
    local = records.open_set(record_set[0])
    remote = records.open_set(f"{bucket}/records")
    assert remote.counts == local.counts
    for here, there in zip(local.shards, remote.shards):
        assert storage.read_bytes(there) == storage.read_bytes(here)
    assert records.read_json(f"{bucket}/records", "summary.json")["records"] == sum(local.counts)
    assert records.read_json(f"{bucket}/records", "stats.json") == records.read_json(record_set[0], "stats.json")
    no_local_gs_folder(os.getcwd())


def test_a_run_on_the_bucket_preempted_and_killed_ends_equal_to_the_local_run(runs, gcs):
    bucket, local, local_workdir, remote, workdir, cwd = runs
    (step_a, a), (step_b, b) = final_params(local, local_workdir), final_params(remote, workdir)
    assert step_a == step_b == STEPS
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["data"]["train"] == f"{bucket}/records"
    assert gs_metrics(workdir)[STEPS]["seen_train"] == STEPS * local.batch_size
    assert any("tfevents" in name for name in os.listdir(gcs.local_path(f"{workdir}/tensorboard")))
    no_local_gs_folder(cwd, os.getcwd())


def test_export_from_the_bucket_to_the_bucket_equals_the_local_export_and_imports_back(runs, tmp_path):
    _, _, local_workdir, remote, workdir, cwd = runs
    hf_dir.export(local_workdir, str(tmp_path / "local"))
    finished(launch(["--workdir", workdir, "--out", f"{workdir}/hf"], devices=1, program=("-m", "tools.export_torch"), cwd=cwd))
    for name in sorted(os.listdir(tmp_path / "local")):
        got, want = storage.read_bytes(f"{workdir}/hf/{name}"), (tmp_path / "local" / name).read_bytes()
        if name == hf_dir.RUN_CONFIG:  # the training config: the same but for where the data lay
            got, want = json.loads(got), json.loads(want)
            for config in (got, want):
                del config["data"]["train"], config["data"]["tokenizer"], config["compilation_cache"]
        assert got == want, name
    # ...and back: caip-import-torch from the bucket into the bucket gives the trained parameters.
    hf_dir.import_torch(f"{workdir}/hf", f"{workdir}-back")
    (_, trained), (step, imported) = final_params(remote, workdir), final_params(remote, f"{workdir}-back")
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, imported, trained)
    assert Checkpoints(f"{workdir}-back").restore_json(0, "progress")["imported_from"] == f"{workdir}/hf"
    no_local_gs_folder(cwd)


def test_probes_and_saliency_read_and_write_the_bucket(record_set, runs):
    bucket, _, local_workdir, _, workdir, cwd = runs
    test_set = f"{bucket}/records"
    finished(launch(["--workdir", workdir, "--train", test_set, "--test", test_set, "--nobaselines", "--batch_size", 8],
                    devices=8, program=("-m", "tools.linear_probe"), cwd=cwd))  # as this process: the same features
    report = json.loads(storage.read_text(f"{workdir}/probe/report.json"))
    expected = linear_probe.evaluate([features.from_checkpoint(local_workdir)], record_set[0], record_set[0], 8)
    assert list(report) == list(expected)
    row, want = next(iter(report.values())), next(iter(expected.values()))
    assert row["retrieval"] == pytest.approx(want["retrieval"], abs=1e-6)
    assert row["probes"]["image_pooled"]["action_r2"] == pytest.approx(want["probes"]["image_pooled"]["action_r2"], abs=1e-5)
    assert storage.read_text(f"{workdir}/probe/report.md").startswith("# ")
    assert Image.open(io.BytesIO(storage.read_bytes(f"{workdir}/probe/r2_by_horizon.png"))).size[0] > 0

    finished(launch(["--workdir", workdir, "--records", test_set, "--num", 3, "--display", 64],
                    devices=1, program=("-m", "tools.saliency"), cwd=cwd))
    tiles = [Image.open(io.BytesIO(storage.read_bytes(f"{workdir}/saliency/{i:03d}.png"))) for i in range(3)]
    assert all(tile.size == (64, 64) for tile in tiles)
    assert storage.exists(f"{workdir}/saliency/sheet.png")
    no_local_gs_folder(cwd)


def test_a_damaged_step_on_the_bucket_falls_back_and_is_set_aside_there(runs, gcs):
    """Last: it changes the run. The newest step loses its optimizer state; a longer run restores
    the step before, moves the damaged one to unusable_checkpoints/ in the bucket, and finishes."""
    *_, remote, workdir, cwd = runs
    damaged = gcs.local_path(f"{workdir}/checkpoints/{STEPS}/opt_state")
    for folder, _, names in os.walk(damaged):
        for name in names:
            os.remove(os.path.join(folder, name))
    out = finished(launch(config_flags(remote, workdir) + [f"--config.checkpoint.every_steps={EVERY}",
                                                           f"--config.total_steps={STEPS + 2}"], devices=8, cwd=cwd))
    assert f"checkpoint step {STEPS}" in out and f"restored step {STEPS - EVERY}" in out
    aside = os.listdir(gcs.local_path(f"{workdir}/unusable_checkpoints"))
    assert [name.split(".")[0] for name in aside] == [str(STEPS)]
    assert Checkpoints(workdir).latest_step() == STEPS + 2
    no_local_gs_folder(cwd)


# -- what a pod user gets wrong: one line, within seconds --------------------------------------


def one_line_error(process, within: float) -> str:
    start = time.time()
    out, _ = process.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.strip()]
    assert process.returncode == 1, out[-3000:]
    assert time.time() - start < within, f"took {time.time() - start:.0f} s"
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.parametrize("flag", ["--config.data.train", "--workdir"])  # a path read, a path written
def test_a_typo_in_the_bucket_is_one_line_naming_the_flag(flag, record_set, bucket, tmp_path):
    config = run_config(record_set)
    flags = {"--config.data.train": config.data.train, "--config.data.tokenizer": config.data.tokenizer,
             "--workdir": f"{bucket}/run"}
    flags[flag] = "gs://no-such-bucket-x/path"
    line = one_line_error(launch([f"--config={tiny_run_config.__file__}"] + [f"{k}={v}" for k, v in flags.items()],
                                 devices=1, cwd=str(tmp_path)), within=60)
    assert flag in line and "gs://no-such-bucket-x does not exist" in line
    no_local_gs_folder(str(tmp_path))


@pytest.mark.parametrize("tool", ["make_records", "train"])
def test_no_credentials_is_one_line_naming_the_fix_within_seconds(tool, record_set, gcs, tmp_path):
    """No emulator, no key file, no gcloud login, the metadata server closed: the credential search
    ends at once, and the tool says how to log in. Writing records, and reading them for training
    (array_record's reader alone would retry for about 16 minutes)."""
    emulator = set(gcs.environment())
    env = {k: v for k, v in os.environ.items() if k not in emulator and k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(GCE_METADATA_HOST=CLOSED_PORT, GCE_METADATA_IP=CLOSED_PORT, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    if tool == "make_records":
        args, flag = ["--source", "demo_world", "--output", "gs://some-bucket/records"], "--output"
    else:
        args = [f"--config={tiny_run_config.__file__}", "--config.data.train=gs://some-bucket/records",
                f"--config.data.tokenizer={record_set[1]}", f"--workdir={tmp_path / 'run'}"]
        flag = "--config.data.train (train)"
    line = one_line_error(launch(args, devices=1, program=("-m", f"tools.{tool}"), cwd=str(tmp_path), env=env), within=60)
    assert f"{flag}=gs://some-bucket/records" in line and "no Google Cloud credentials" in line
    assert "gcloud auth application-default login" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line


def test_a_read_only_bucket_is_one_line_before_any_work(record_set, bucket, gcs, tmp_path):
    proxy = Proxy(gcs.endpoint, read_only=True)
    try:
        env = dict(os.environ, **proxy.environment())
        line = one_line_error(launch(["--source", "npz", "--input", os.path.join(os.path.dirname(record_set[0]), "npz"),
                                      "--output", f"{bucket}/records"], devices=1, program=("-m", "tools.make_records"),
                                     cwd=str(tmp_path), env=env), within=60)
    finally:
        proxy.close()
    assert f"--output={bucket}/records cannot be written" in line and "roles/storage.objectUser" in line
    assert not os.listdir(gcs.local_path(bucket))  # nothing was written, and nothing said it was
