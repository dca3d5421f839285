"""Feature extraction over 2 processes on 127.0.0.1 (2 CPU devices each, a loader worker each)
gives what one process with 4 devices gives: every feature, the action targets and the
records' metadata, the last, padded batch included."""
import os

import numpy as np
import pytest

from test_train import finish, launch

HELPER = (os.path.join(os.path.dirname(__file__), "extract_features_main.py"),)


@pytest.mark.slow
def test_two_processes_extract_like_one(record_set, tmp_path):
    records, tokenizer = record_set  # 18 records: batches of 8, the third padded
    finish(launch([records, tokenizer, tmp_path / "one.npz", 0], devices=4, program=HELPER))
    port = 20000 + (os.getpid() + 7) % 20000
    two = [launch([records, tokenizer, tmp_path / f"two_{i}.npz", 1, f"127.0.0.1:{port}", 2, i], devices=2,
                  program=HELPER) for i in range(2)]
    for process in two:
        finish(process)

    expected = np.load(tmp_path / "one.npz")
    assert len(expected["episode_id"]) == 18
    for i in range(2):  # every process gets all the features
        got = np.load(tmp_path / f"two_{i}.npz")
        assert set(got.files) == set(expected.files)
        for key in expected.files:
            if expected[key].dtype.kind in "fc":
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
