"""The sigmoid loss against the SigLIP paper's formula, and the ring form against the dense one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caip_jax import loss

EMBED = 12  # distinct from every batch size below, so the shape check cannot confuse them


def embeddings(batch, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(2, batch, EMBED)).astype(np.float32)
    # Correlated pairs, so that the positive and negative terms both matter.
    y = x + 1.5 * y
    return np.asarray(loss.l2_normalize(x)), np.asarray(loss.l2_normalize(y))


def paper_formula(x, y, t, b):
    """-1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t' x_i . y_j - b)))), t' = exp(t), in float64
    loops (SigLIP paper, Algorithm 1 and eq. 1)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            z = 1.0 if i == j else -1.0
            total += np.log(1.0 / (1.0 + np.exp(z * (-np.exp(t) * x[i] @ y[j] - b))))
    return -total / len(x)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_dense_loss_is_the_paper_formula(batch):
    x, y = embeddings(batch, seed=batch)
    t, b = np.log(10.0), -10.0
    np.testing.assert_allclose(loss.sigmoid_loss(x, y, t, b), paper_formula(x, y, t, b), rtol=1e-5)
    t, b = 0.3, 1.5  # away from the init, where positives and negatives weigh alike
    np.testing.assert_allclose(loss.sigmoid_loss(x, y, t, b), paper_formula(x, y, t, b), rtol=1e-5)


def test_retrieval_top1_counts_rows_whose_own_column_wins():
    x = np.eye(4, 3, dtype=np.float32)  # rows 0..2 one-hot, row 3 zero
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]], np.float32)
    # Row 0: column 0 wins (correct). Row 1: all ties at 0, argmax 0 (wrong). Row 2: columns 1
    # and 2 tie, argmax 1 (wrong). Row 3: all zero, argmax 0 (wrong).
    assert loss.retrieval_top1(x, y) == 0.25


def test_l2_normalize_matches_big_vision_epsilon():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(loss.l2_normalize(x), [[3 / (5 + 1e-8), 4 / (5 + 1e-8)], [0, 0]])


def make_mesh(data, fsdp):
    devices = np.array(jax.devices()[: data * fsdp]).reshape(data, fsdp, 1)
    return Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize(
    "data,fsdp,batch",
    [(4, 1, 8), (4, 1, 12), (8, 1, 16), (8, 1, 32), (2, 4, 16), (1, 4, 8), (2, 1, 2)],
)
def test_chunked_loss_equals_dense_in_value_and_gradient(data, fsdp, batch):
    mesh = make_mesh(data, fsdp)
    x, y = embeddings(batch, seed=batch + data)
    t, b = jnp.float32(0.7), jnp.float32(-2.0)
    sharded = NamedSharding(mesh, P(("data", "fsdp")))
    xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)

    def chunked(x, y, t, b):
        return loss.chunked_sigmoid_loss(x, y, t, b, mesh)

    dense_value, dense_grads = jax.value_and_grad(loss.sigmoid_loss, argnums=(0, 1, 2, 3))(x, y, t, b)
    (value, top1), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(xs, ys, t, b)
    np.testing.assert_allclose(value, dense_value, rtol=1e-5)
    assert top1 == loss.retrieval_top1(x, y)
    assert batch < 12 or 0 < top1 < 1  # a top-1 of 0 or 1 would prove little
    for name, g, dense_g in zip(("z_image", "z_action", "t", "b"), grads, dense_grads):
        np.testing.assert_allclose(g, dense_g, rtol=1e-5, atol=1e-7, err_msg=name)


def _all_shapes(jaxpr):
    """Every value shape in a jaxpr, nested jaxprs (shard_map, scan) included."""
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval") and hasattr(var.aval, "shape"):
                yield eqn.primitive.name, var.aval.shape
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax_core.Jaxpr):
                    yield from _all_shapes(inner)


def test_chunked_loss_memory_is_per_block():
    """Per-device memory is O(b^2 + B D / n), not O(B b): inside the sharded computation,
    forward and backward, no value is as large as a device's share of the full logit matrix,
    neither one [b, B] block nor the [n - 2, b, b] stack of every step's logits that a scan
    would keep for its backward pass."""
    devices, batch, width = 8, 128, 4  # local batch 16; embeddings small next to the logits
    mesh = make_mesh(devices, 1)
    rng = np.random.default_rng(0)
    x, y = (np.asarray(loss.l2_normalize(rng.normal(size=(batch, width)))) for _ in range(2))

    def chunked(x, y):
        return loss.chunked_sigmoid_loss(x, y, 0.0, 0.0, mesh)[0]

    jaxpr = jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(x, y).jaxpr
    shard_map_eqns = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert shard_map_eqns, "the loss should run inside shard_map"
    inner = [shape for e in shard_map_eqns for _, shape in _all_shapes(e.params["jaxpr"])]
    local = batch // devices
    assert (local, local) in inner  # the [b, b] block is there...
    largest = max(int(np.prod(shape)) for shape in inner)
    assert largest < local * batch / 2, largest  # ...and nothing near [b, B]
