"""Test-session setup: CPU only, 8 virtual devices for the multi-device tests, no network."""
import os

# Must happen before JAX initialises its backend (the first jax.devices() or computation).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
