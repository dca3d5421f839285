"""CAIP with SigLIP 2 B/16 towers at 256 px (256 patches), T = 64, text length 64."""
from caip_jax.config import base_config


def get_config():
    return base_config("B/16")
