"""CAIP with SigLIP 2 So400m/16 towers at 256 px (256 patches), T = 64, text length 64.

Planned for v5p-128 (`v5p:4x4x4`, 64 chips) at batch 16384 by benchmarks/compile.py: scanned
blocks, remat "dots_no_batch", fsdp over all chips: 65% of HBM, an estimated 0.94 s a step at
50% of peak. On 256 chips fsdp cannot exceed 128 (the width 1152 does not divide by 256): use
`config.mesh.data=2`; there v5p-512 takes `dots`, v6e-256 `dots_no_batch`, v5e-256 `full`
(benchmarks/RESULTS.md, "Pod plans"); at batch 32768 on v5p-128, `full`.

Exact accumulation (`optim.accum_steps=k`, the whole batch's gradient in k micro-batches) costs
one more forward of the towers, 9% more than `full` remat by the estimate: the plan where `full`
does not fit the batch wanted (a smaller slice, a GPU node), not in its place.
"""
from caip_jax.config import base_config


def get_config():
    config = base_config("So400m/16")
    config.model.scan = True
    config.model.remat_policy = "dots_no_batch"
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config
