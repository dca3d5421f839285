"""Logical axis names of parameters and activations, and the one table that maps them to the
mesh axes `data`, `fsdp` and `tensor`.

Batch is split over `data` and `fsdp`; parameters are split along their width (`embed`) over
`fsdp` (ZeRO-3 style: gathered per layer when used) and along heads and MLP width over `tensor`.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    ("layers", None),  # the stacked depth axis of scanned blocks: every device holds all layers' shards
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data`, `fsdp`, `tensor` sized by `shape`
    (e.g. config.mesh); one size may be -1 for "the rest". Devices are ordered so that each
    process's devices are contiguous along the batch axes, which
    `jax.make_array_from_process_local_data` needs for a process's rows of the batch."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, at most one -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh={dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, found {len(devices)}: "
            "set one axis of config.mesh to -1"
        )
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings of a Flax variable tree whose leaves are `nn.Partitioned` boxes (e.g.
    from `jax.eval_shape(model.init, ...)`), through LOGICAL_AXIS_RULES; the result has the
    structure of the unboxed tree."""
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes `data` x `fsdp`."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the batch axes data x fsdp = {ways} of "
            f"config.mesh={dict(mesh.shape)}: use e.g. batch_size={-(-batch_size // ways) * ways}"
        )


def check_divisible(boxed_abstract: Any, mesh: Mesh) -> None:
    """Every parameter dimension split over mesh axes must divide by their size; names the first
    that does not, before jit fails with a bare IndivisibleError."""
    specs = jax.tree.leaves(nn.get_partition_spec(boxed_abstract), is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_abstract))
    for (path, leaf), spec in zip(leaves, specs):
        mesh_axes = nn.logical_to_mesh_axes(spec, LOGICAL_AXIS_RULES)
        for dim, (size, logical, axes) in enumerate(zip(leaf.shape, spec, mesh_axes)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in axes]))
            if size % ways:
                fits = [d for d in range(ways, 0, -1) if size % d == 0][0]
                raise ValueError(
                    f"config.mesh={dict(mesh.shape)} splits dimension {dim} (logical axis {logical!r}, size {size}) "
                    f"of parameter {jax.tree_util.keystr(path)} over {'x'.join(axes)} = {ways} ways, which does not "
                    f"divide it: make {'x'.join(axes)} at most {fits} (e.g. config.mesh.{axes[0]}={fits} and the rest "
                    f"on another axis), or use a model size divisible by {ways}"
                )


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh) -> tuple[Any, Any]:
    """Runs `init_fn(rng)` (returning boxed Flax variables) with every parameter created in
    place on its shards, so no host ever holds the whole model. -> (unboxed variables, their
    shardings)."""
    shardings = param_shardings(jax.eval_shape(init_fn, rng), mesh)
    variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return variables, shardings
