"""CAIP with SigLIP 2 L/16 towers at 256 px (256 patches), T = 64, text length 64.

Planned for v5p-128 (`v5p:4x4x4`, 64 chips) at batch 16384 by benchmarks/compile.py: scanned
blocks, remat "dots_no_batch", fsdp over all chips: 53% of HBM, an estimated 0.69 s a step at
50% of peak. Other pods (benchmarks/RESULTS.md, "Pod plans"): v5p-512 `none`, v6e-256
`dots_no_batch`, v5e-256 `full`; at batch 32768 on v5p-128, `full`.

Exact accumulation (`optim.accum_steps=4`, the whole batch's gradient in micro-batches of 8192,
remat `dots`) fits batch 32768 on v5p-128 in 46% of HBM but is estimated 9% slower than `full`
(one more forward against full's recomputation): use it where `full` does not fit the batch
wanted (a smaller slice, a GPU node), not in its place.
"""
from caip_jax.config import base_config


def get_config():
    config = base_config("L/16")
    config.model.scan = True
    config.model.remat_policy = "dots_no_batch"
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config
