"""The analytic model FLOPs against XLA's count of the compiled forward and backward."""
import flax.linen as nn
import jax
import numpy as np

import tiny_run_config
from caip_jax import flops, run_state, sharding, train_step


def wide_tiny_config(remat_policy="none"):
    """The tiny model at width 128, where the elementwise work XLA counts besides the matmuls
    is about 2% of the whole; unscanned, dense loss (XLA counts a scan body once)."""
    config = tiny_run_config.get_config()
    config.loss, config.model.remat_policy = "dense", remat_policy
    config.mesh.update(data=1, fsdp=1)
    config.model.update(width=128, mlp_dim=512, num_heads=4)
    config.model.action.update(width=64, mlp_dim=256, num_heads=4)
    return config


def xla_flops(config, backward=True):
    run = run_state.setup(config, jax.devices()[:1])
    params = run_state.abstract_params(run)
    batch = train_step.abstract_batch(config, run.mesh)
    stats = np.zeros((1, 2, 21, 9), np.float32), np.ones((1, 2, 21, 9), np.float32)
    loss = lambda p, b: train_step.make_loss_fn(run.model, run.mesh, config, *stats)(p, b)[0]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        # value_and_grad, not grad: with the value unused, XLA would drop the forward pass and
        # run only the rematerialised one.
        fn = jax.value_and_grad(loss) if backward else loss
        return jax.jit(fn).lower(params, batch).compile().cost_analysis()["flops"]


def test_model_flops_match_xla_cost_analysis():
    config = wide_tiny_config()
    parts = flops.forward_flops_per_sample(config.model, config.batch_size)
    forward = sum(parts[k] for k in ("image", "text", "pool", "action", "loss")) * config.batch_size
    train = flops.train_flops_per_sample(config.model, config.batch_size) * config.batch_size
    xla_forward, xla_train = xla_flops(config, backward=False), xla_flops(config)
    assert forward <= xla_forward <= 1.04 * forward, (xla_forward, forward)
    assert train <= xla_train <= 1.04 * train, (xla_train, train)


def test_full_remat_flops_match_xla_cost_analysis():
    """What remat_policy='full' adds: the blocks' matmuls but the MLP output's, run again (and
    the elementwise work, about 3% more here)."""
    config = wide_tiny_config("full")
    recomputed = flops.remat_flops_per_sample(config.model) * config.batch_size
    xla_recomputed = xla_flops(config) - xla_flops(wide_tiny_config("none"))
    assert recomputed <= xla_recomputed <= 1.06 * recomputed, (xla_recomputed, recomputed)
