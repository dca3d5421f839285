"""Checkpoint writes on a mesh: replicated arrays are cut among their replicas only where the
slices are large enough to be worth a device op each, and every array restores exactly."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from caip_jax import checkpoint
from caip_jax.checkpoint import Checkpoints


def test_small_replicated_arrays_are_saved_whole_large_ones_by_every_replica(tmp_path, monkeypatch):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])
    rng = np.random.default_rng(0)
    large_rows = 8 * checkpoint.MIN_REPLICA_SLICE_BYTES // (4 * 256)  # one replica's eighth: the threshold
    host = dict(
        bias=rng.standard_normal(512, np.float32),  # replicated on 8 devices: 256-byte eighths
        kernel=rng.standard_normal((64, 128), np.float32),  # split over fsdp, replicated over data
        table=rng.standard_normal((large_rows, 256), np.float32),  # replicated: 1 MiB eighths
    )
    specs = dict(bias=P(), kernel=P(None, "fsdp"), table=P())
    tree = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}

    sliced = []
    slice_in_dim = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda x, *a, **k: sliced.append(x.shape) or slice_in_dim(x, *a, **k))
    checkpoints = Checkpoints(str(tmp_path), asynchronous=False)
    checkpoints.save(1, tree)
    # The table's 8 replicas each write an eighth; nothing else is cut (orbax's default also cuts
    # the bias 8 ways and each kernel shard 2 ways: 16 more device ops, for 34 KiB).
    assert sliced == [host["table"].shape] * 8

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    restored = checkpoints.restore(1, abstract)["params"]
    checkpoints.close()
    for name, array in host.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), array, err_msg=name)
        assert restored[name].sharding == tree[name].sharding, name
