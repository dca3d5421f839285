"""The policy for CPU runs and tests: a 2-block decoder of width 64 over frozen features
(caip-policy-eval's default)."""
from caip_jax.policy.config import policy_config


def get_config():
    return policy_config("tiny")
