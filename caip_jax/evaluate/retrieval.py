"""Cross-modal retrieval recall@k between paired embeddings (row i of each side is a pair),
computed blockwise over queries so that n = 50k never builds an n x n similarity matrix."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _normalise(x):
    # Divide by the exact norm (not rsqrt): duplicated vectors must score bit-identically.
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="block_size")
def _ranks(queries, keys, block_size):
    """Rank [n] of each query's own key: 1 + #(j != i with s_ij >= s_ii), s = cosine."""
    n, d = queries.shape
    q, k = _normalise(queries), _normalise(keys)
    blocks = -(-n // block_size)
    q = jnp.pad(q, ((0, blocks * block_size - n), (0, 0))).reshape(blocks, block_size, d)

    def block(args):
        qb, start = args
        s = jnp.matmul(qb, k.T, precision=jax.lax.Precision.HIGHEST)  # [block, n]
        own = jnp.minimum(start + jnp.arange(block_size), n - 1)  # padded rows: any valid index
        # s_ii is read from the same matrix, so a tie is a tie bit for bit; j = i counts itself.
        s_own = jnp.take_along_axis(s, own[:, None], axis=1)
        return jnp.sum(s >= s_own, axis=1)

    return jax.lax.map(block, (q, jnp.arange(blocks) * block_size)).reshape(-1)[:n]


def recall_at_k(queries, keys, ks=(1, 5, 10), block_size: int = 1024) -> dict[str, float]:
    """queries [n, d], keys [n, d'] with d == d' -> {"recall@k": fraction of queries whose own key
    (key i for query i) has rank <= k} by cosine similarity; keys scoring the same as the own key
    rank ahead of it (rank = 1 + #(j != i with s_ij >= s_ii)). block_size queries at a time."""
    queries, keys = jnp.asarray(queries, jnp.float32), jnp.asarray(keys, jnp.float32)
    if queries.ndim != 2 or queries.shape != keys.shape:
        raise ValueError(f"need paired queries and keys [n, d]; got {queries.shape} and "
                         f"{keys.shape}: project both sides to one embedding width first")
    ranks = np.asarray(_ranks(queries, keys, min(block_size, len(queries))))
    return {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}


def retrieval_report(image_text, action, ks=(1, 5, 10), block_size: int = 1024) -> dict[str, float]:
    """recall@k both ways between image_text [n, d] and action [n, d]: keys
    "image_text_to_action/recall@k" (image-text queries, action keys) and
    "action_to_image_text/recall@k"."""
    out = {}
    for name, (q, k) in {"image_text_to_action": (image_text, action),
                         "action_to_image_text": (action, image_text)}.items():
        out.update({f"{name}/{m}": v for m, v in recall_at_k(q, k, ks, block_size).items()})
    return out
