"""Policy configs: the paper's 0.8 B size from shapes alone, and errors that name the field."""
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from caip_jax.policy import config as policy_config
from caip_jax.policy import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def with_inputs(config, features=(1, 1024), state=32, action=44):
    """The sizes a policy takes from its data: a bimanual robot's state and actions on L/16's
    pooled feature."""
    config.dims = ml_collections.ConfigDict(dict(features=list(features), state=state, action=action))
    config.instructions = ["task"] * 6
    return config


def test_the_papers_size_is_0p8b_parameters():
    # 28 blocks x (4 D^2 attention + 2 D x 4D MLP, with biases and norms) at D = 1536, plus the
    # input and output projections: counted from the shapes (nothing is allocated).
    blocks = 28 * (4 * 1536 * 1536 + 4 * 1536 + 2 * 1536 * 6144 + 6144 + 1536 + 4 * 1536)
    config = with_inputs(load("policy_0p8b"))
    assert config.model.scan and config.model.remat_policy == "dots_no_batch"  # scanned, rematerialised
    count = train.num_params(config)
    assert blocks < count < blocks * 1.01 and 0.79e9 < count < 0.81e9


def test_tiny_config_validates_and_bad_fields_are_named():
    config = load("policy_tiny")
    policy_config.validate(config)
    for field, value, message in (
        ("features", "cls", r"features='cls' is not one of \('pooled', 'patches'\)"),
        ("execute", 9, r"execute=9 must be in \[1, horizon=8\]"),
        ("flow_steps", 0, r"flow_steps=0 must be >= 1"),
        ("total_steps", 0, r"total_steps=0 must be >= 1 \(a policy needs training\)"),
        ("time_sampling", "logit_normal", r"time_sampling='logit_normal' is not one of \('beta', 'uniform'\)"),
    ):
        bad = config.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            policy_config.validate(bad)
    bad = config.copy_and_resolve_references()
    bad.model.remat_policy = "some"
    with pytest.raises(ValueError, match=r"model.remat_policy='some' is not one of \['dots'"):
        policy_config.validate(bad)
    bad = config.copy_and_resolve_references()
    bad.model.head = "diffusion"
    with pytest.raises(ValueError, match=r"model.head='diffusion' is not one of \('flow', 'mse'\)"):
        policy_config.validate(bad)
    with pytest.raises(ValueError, match=r"policy size '7B' is not one of \['0.8B', 'tiny'\]"):
        policy_config.policy_config("7B")


def test_zero_training_steps_is_a_clean_error(tmp_path):
    """train() refuses total_steps=0 by name before anything is built (it reached an unbound
    variable after the loop)."""
    from caip_jax.policy.dataset import TrainingSet

    config = load("policy_tiny")
    config.total_steps = 0
    data = TrainingSet.build([np.zeros((3, 1, 2))], [np.zeros((3, 4))], [np.zeros((3, 4))], ["a"], horizon=8)
    with pytest.raises(ValueError, match=r"total_steps=0 must be >= 1"):
        train.train(config, data, str(tmp_path / "policy"))
    assert not os.path.exists(tmp_path / "policy" / "checkpoints")
