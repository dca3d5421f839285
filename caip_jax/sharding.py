"""Logical axis names of parameters and activations, and the one table that maps them to the
mesh axes `data`, `fsdp` and `tensor`.

Batch is split over `data` and `fsdp`; parameters are split along their width (`embed`) over
`fsdp` (ZeRO-3 style: gathered per layer when used) and along heads and MLP width over `tensor`.
"""

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("norm", None),
)
