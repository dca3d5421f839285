"""A run config for the tiny test model (tests/tiny_config.py): 8 samples a step, every step logged.
Tests set data.train and data.tokenizer (to the record_set fixture's)."""
import os

import tiny_config
from caip_jax.config import base_config


def get_config():
    config = base_config()
    config.model = tiny_config.tiny_model_config()
    config.model.text.vocab_size = 300  # the record_set fixture's tokenizer has 284 ids
    config.total_steps, config.batch_size = 6, 8
    config.data.workers = 0
    config.mesh.update(data=2, fsdp=-1, tensor=1)
    config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 2
    config.checkpoint.every_steps = 100
    config.log.every_steps = 1
    config.compilation_cache = os.environ.get("CAIP_TEST_COMPILATION_CACHE", config.compilation_cache)  # conftest.py
    return config
