"""The sigmoid contrastive loss of SigLIP (Zhai et al., 2023), between images and actions.

For L2-normalised x_i (image side) and y_j (action side), logits_ij = exp(t) <x_i, y_j> + b and
z_ij = +1 if i == j else -1:  L = -(1/B) sum_i sum_j log sigmoid(z_ij logits_ij).

`sigmoid_loss` is the dense form (a [B, B] matrix). `chunked_sigmoid_loss` is the paper's
multi-device form: each device scores its local pairs, then passes its action embeddings around
a ring of devices and scores them as negatives, so no device holds more than a [b, b] block
(b = B / devices) and no embedding is ever gathered.
"""
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / (||x|| + eps) along the last axis, in float32, as big_vision normalises embeddings."""
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _pair_loss_sum(z_image, z_action, t, b, positives_on_diagonal: bool):
    """Sum of -log sigmoid(z_ij logits_ij) over a [b, b'] block of pairs."""
    logits = jnp.exp(t) * z_image @ z_action.T + b
    labels = -jnp.ones_like(logits)
    if positives_on_diagonal:
        labels = labels + 2 * jnp.eye(*logits.shape, dtype=logits.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(z_image: jax.Array, z_action: jax.Array, t: jax.Array, b: jax.Array) -> jax.Array:
    """z_image [B, D], z_action [B, D] (L2-normalised; row i of each is a positive pair),
    scalars t (log temperature) and b -> scalar loss."""
    return _pair_loss_sum(z_image, z_action, t, b, positives_on_diagonal=True) / z_image.shape[0]


def chunked_sigmoid_loss(
    z_image: jax.Array,
    z_action: jax.Array,
    t: jax.Array,
    b: jax.Array,
    mesh: Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
) -> jax.Array:
    """The same value and gradients as `sigmoid_loss`, with the batch sharded over `batch_axes`
    of `mesh`. Memory per device is O(b^2) for local batch b.

    z_image [B, D], z_action [B, D] sharded along B over `batch_axes`; t, b scalars -> scalar.
    """
    batch = z_image.shape[0]
    n = 1
    for axis in batch_axes:
        n *= mesh.shape[axis]
    # Device i sends to i + 1, so after s shifts it holds the actions of device i - s.
    shift = [(i, (i + 1) % n) for i in range(n)]

    def local(z_img, z_act, t, b):
        def negatives(z_other):
            return _pair_loss_sum(z_img, z_other, t, b, positives_on_diagonal=False)

        total = _pair_loss_sum(z_img, z_act, t, b, positives_on_diagonal=True)
        if n > 1:
            z_act = jax.lax.ppermute(z_act, batch_axes, shift)

            def step(carry, _):
                total, z_act = carry
                # The next chunk travels while this one is scored: the two are independent, so
                # XLA can overlap the collective with the matmul.
                z_next = jax.lax.ppermute(z_act, batch_axes, shift)
                return (total + negatives(z_act), z_next), None

            (total, z_act), _ = jax.lax.scan(step, (total, z_act), None, length=n - 2)
            total = total + negatives(z_act)
        return jax.lax.psum(total, batch_axes) / batch

    spec = P(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
        z_image, z_action, t, b
    )
