"""Parameter counts of a CAIP config, from shapes alone (`jax.eval_shape`: nothing allocated)."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from caip_jax.models.caip import dummy_inputs, model_from_config


def abstract_params(config: ml_collections.ConfigDict):
    """The parameter tree of the model `config` describes, as shapes and dtypes only."""
    model = model_from_config(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config)))
    return nn.unbox(variables["params"])


def parameter_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameters per top-level part (`img`, `txt`, `act`, `pool`, `t`, `b`) and in `total`."""
    params = abstract_params(config)
    counts = {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[name]))
        for name in ("img", "txt", "act", "pool", "t", "b")
    }
    counts["total"] = sum(counts.values())
    return counts
