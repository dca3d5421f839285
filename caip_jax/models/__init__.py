"""The CAIP towers and pooling. `model_from_config` builds the whole model."""
from caip_jax.models.caip import CAIP, dummy_inputs, model_from_config, validate

__all__ = ["CAIP", "dummy_inputs", "model_from_config", "validate"]
