"""The sigmoid contrastive loss of SigLIP (Zhai et al., 2023), between images and actions.

For L2-normalised x_i (image side) and y_j (action side), logits_ij = exp(t) <x_i, y_j> + b and
z_ij = +1 if i == j else -1:  L = -(1/B) sum_i sum_j log sigmoid(z_ij logits_ij).

`sigmoid_loss` is the dense form (a [B, B] matrix). `chunked_sigmoid_loss` is the paper's
multi-device form: each device scores its local pairs, then passes its action embeddings around
a ring of devices and scores them as negatives, so no device holds more than a [b, b] block
(b = B / devices) and no embedding is ever gathered.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / (||x|| + eps) along the last axis, in float32, as big_vision normalises embeddings."""
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _block(z_image, z_action, t, b, positives_on_diagonal: bool):
    """A [b, b'] block of pairs -> (sum of -log sigmoid(z_ij logits_ij), the best negative
    similarity of each image [b] (for retrieval accuracy), the positive similarities [b] or
    None)."""
    similarity = z_image @ z_action.T
    logits = jnp.exp(t) * similarity + b
    labels = -jnp.ones_like(logits)
    positive = None
    if positives_on_diagonal:
        eye = jnp.eye(*logits.shape, dtype=bool)
        labels = jnp.where(eye, 1.0, labels)
        positive = jnp.diagonal(similarity)
        similarity = jnp.where(eye, -jnp.inf, similarity)
    loss_sum = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    return loss_sum, jax.lax.stop_gradient(similarity.max(axis=1)), positive


def sigmoid_loss(z_image: jax.Array, z_action: jax.Array, t: jax.Array, b: jax.Array) -> jax.Array:
    """z_image [B, D], z_action [B, D] (L2-normalised; row i of each is a positive pair),
    scalars t (log temperature) and b -> scalar loss."""
    return _block(z_image, z_action, t, b, positives_on_diagonal=True)[0] / z_image.shape[0]


def retrieval_top1(z_image: jax.Array, z_action: jax.Array) -> jax.Array:
    """Fraction of images whose own action is the most similar of the batch (chance 1/B)."""
    similarity = z_image @ z_action.T
    return jnp.mean(jnp.argmax(similarity, axis=1) == jnp.arange(len(similarity)))


def chunked_sigmoid_loss(
    z_image: jax.Array,
    z_action: jax.Array,
    t: jax.Array,
    b: jax.Array,
    mesh: Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
) -> tuple[jax.Array, jax.Array]:
    """The same value and gradients as `sigmoid_loss`, with the batch sharded over `batch_axes`
    of `mesh`; also `retrieval_top1` over the global batch, from the same pass. Memory per
    device is O(b^2) for local batch b.

    z_image [B, D], z_action [B, D] sharded along B over `batch_axes`; t, b scalars ->
    (loss, top1) scalars.
    """
    batch = z_image.shape[0]
    n = 1
    for axis in batch_axes:
        n *= mesh.shape[axis]
    # Device i sends to i + 1, so after s shifts it holds the actions of device i - s.
    shift = [(i, (i + 1) % n) for i in range(n)]

    # Recomputed in the backward pass: otherwise the scan would keep every step's [b, b]
    # logits for it, O(B b) memory in all, as much as the dense form.
    negative_block = jax.checkpoint(functools.partial(_block, positives_on_diagonal=False))

    def local(z_img, z_act, t, b):
        def negatives(carry, z_other):
            total, best = carry
            block_sum, block_best, _ = negative_block(z_img, z_other, t, b)
            return total + block_sum, jnp.maximum(best, block_best)

        total, best, positive = _block(z_img, z_act, t, b, positives_on_diagonal=True)
        carry = (total, best)
        if n > 1:
            z_act = jax.lax.ppermute(z_act, batch_axes, shift)

            def step(state, _):
                carry, z_act = state
                # The next chunk travels while this one is scored: the two are independent, so
                # XLA can overlap the collective with the matmul.
                z_next = jax.lax.ppermute(z_act, batch_axes, shift)
                return (negatives(carry, z_act), z_next), None

            (carry, z_act), _ = jax.lax.scan(step, (carry, z_act), None, length=n - 2)
            carry = negatives(carry, z_act)
        total, best = carry
        correct = jnp.sum(positive > best)
        return jax.lax.psum(total, batch_axes) / batch, jax.lax.psum(correct, batch_axes) / batch

    spec = P(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=(P(), P()))(
        z_image, z_action, t, b
    )
