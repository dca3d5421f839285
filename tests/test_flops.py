"""The analytic model FLOPs against XLA's count of the compiled forward and backward."""
import flax.linen as nn
import jax
import numpy as np

import tiny_run_config
from caip_jax import flops, run_state, sharding, train_step


def test_model_flops_match_xla_cost_analysis():
    """XLA counts every matmul we count plus the elementwise work (norms, softmax, GELU, the
    preprocessing), a share that shrinks with the width: at width 128 it is about 2%."""
    config = tiny_run_config.get_config()
    config.loss, config.model.remat_policy = "dense", "none"  # XLA counts a scan body once
    config.mesh.update(data=1, fsdp=1)
    config.model.update(width=128, mlp_dim=512, num_heads=4)
    config.model.action.update(width=64, mlp_dim=256, num_heads=4)
    run = run_state.setup(config, jax.devices()[:1])
    params = run_state.abstract_params(run)
    batch = train_step.abstract_batch(config, run.mesh)
    stats = np.zeros((1, 2, 21, 9), np.float32), np.ones((1, 2, 21, 9), np.float32)
    loss = lambda p, b: train_step.make_loss_fn(run.model, run.mesh, config, *stats)(p, b)[0]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        xla_train = jax.jit(jax.grad(loss)).lower(params, batch).compile().cost_analysis()["flops"]
        xla_forward = jax.jit(loss).lower(params, batch).compile().cost_analysis()["flops"]

    parts = flops.forward_flops_per_sample(config.model, config.batch_size)
    forward = sum(parts[k] for k in ("image", "text", "pool", "action", "loss")) * config.batch_size
    train = flops.train_flops_per_sample(config.model, config.batch_size) * config.batch_size
    assert forward <= xla_forward <= 1.04 * forward, (xla_forward, forward)
    assert train <= xla_train <= 1.04 * train, (xla_train, train)
