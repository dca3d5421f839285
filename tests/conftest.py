"""Test-session setup: CPU only, 8 virtual devices for the multi-device tests, no network;
and fixtures shared by several test files."""
import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# Must happen before JAX initialises its backend (the first jax.devices() or computation).
# The tiny models compile for longer than they run: without LLVM's optimisations XLA:CPU compiles
# a tiny model's initialisation in half the time (8.2 s -> 4.0 s), and two tiny runs take 70 s
# instead of 85. Processes that tests start get the same flags (test_train.launch), so runs
# compared bitwise are compiled alike.
os.environ["CAIP_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), os.environ["CAIP_TEST_XLA_FLAGS"], "--xla_force_host_platform_device_count=8"]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
# No client may look for the GCE metadata server beyond loopback (google-auth reads these).
os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# trust_remote_code copies model code here; read by transformers when first imported.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf_modules_")
# One compilation cache for the tiny runs of this pytest worker and the processes it starts
# (tiny_run_config reads it): the same step compiles once, not in every run that trains it. Set,
# not defaulted: xdist workers inherit the controller's environment, and JAX's cache writes are
# not atomic, so two workers must not share one.
os.environ["CAIP_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="caip_xla_cache_")
for scratch in (os.environ["HF_MODULES_CACHE"], os.environ["CAIP_TEST_COMPILATION_CACHE"]):
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
# The worker's own programs too: a test that builds what an earlier one built (a policy trained
# again, an encoder's forward pass) loads it.
import jax  # noqa: E402  (after the XLA flags above)
from caip_jax import xla_cache  # noqa: E402

xla_cache.use(os.environ["CAIP_TEST_COMPILATION_CACHE"])


@pytest.fixture(autouse=True)
def worker_compilation_cache():
    """A test that trains in this process with a config's own cache (the default's
    {workdir}/compilation_cache) leaves JAX writing there: the tests after it go back to the
    worker's, or they compile again what it holds."""
    yield
    if jax.config.jax_compilation_cache_dir != os.environ["CAIP_TEST_COMPILATION_CACHE"]:
        xla_cache.use(os.environ["CAIP_TEST_COMPILATION_CACHE"])


@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    """A record set of 6 npz episodes (18 samples) and a sentencepiece model for its texts."""
    from caip_jax.data import convert, tokenizer
    from test_convert import OPTIONS, rigid_episode, write_npz

    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(1)
    for i in range(6):
        write_npz(str(root / "npz"), f"episode_{i}", **dict(rigid_episode(rng), text=f"pick up cup {i}"))
    convert.convert("npz", str(root / "npz"), str(root / "records"), OPTIONS, shards=2)
    spm = tokenizer.train_sentencepiece([f"pick up cup {i}" for i in range(6)] * 10, str(root / "spm"), 284)
    return str(root / "records"), spm




@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on loopback for this pytest worker, every client pointed at it from here on
    (subprocesses inherit the variables); see tests/gcs.py."""
    from gcs import Emulator

    emulator = Emulator()
    os.environ.update(emulator.environment())
    yield emulator
    emulator.close()


@pytest.fixture
def bucket(gcs, request):
    """A new empty bucket of the emulator, "gs://NAME"."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    return gcs.create_bucket(name)
