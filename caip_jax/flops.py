"""Model FLOPs of a training step, counted analytically from the config (for MFU).

Matmul FLOPs only (2 per multiply-add), of what the loss depends on. For n tokens of width d
(MLP width m) attending to n' tokens:

    attention(n, n', d) = 4 n d^2 + 4 n' d^2 + 4 n n' d     (q, out; k, v; logits, weights @ v)
    block(n, d, m)      = attention(n, n, d) + 4 n d m       (one pre-LN transformer block)
    pool(n, n', d, m)   = attention(n, n', d) + 4 n d m      (an attention pool and its MLP)

Per sample, with N = (image_size / patch)^2 patches, L text tokens, T action steps, tower
width D, depth depth, MLP M, pooling MLP M_p, action tower width D_a, depth_a, MLP M_a, and
global batch B:

    image  = 2 N (3 patch^2) D + depth block(N, D, M)
    text   = depth block(L, D, M)                           (the embedding is a lookup)
    pool   = pool(L, N, D, M_p) + pool(1, L, D, M_p)
    action = 2 T (2*21*9 + 2) D_a + depth_a block(T + 1, D_a, M_a) + 2 D_a D
    loss   = 2 B D                                          (this sample's row of the [B, B] logits)

    train  = 3 (image + text + pool + action + loss) - (patch and action embeddings)
    remat  = sum over the three encoders of depth recomputed(n, d, m), with recomputed =
             0 (none, dots), 4 n^2 d (dots_no_batch), block(n, d, m) - 2 n d m (full)

Forward and backward cost 3 forwards (each matmul's backward computes the gradients of both its
operands), except the two embeddings of the data, whose inputs need no gradient (2 forwards).
The image tower's own MAP head and the text head feed no loss term: XLA drops them, and they are
not counted. Rematerialisation is not model work: `remat_flops_per_sample` counts it apart.
Elementwise work (norms, softmax, GELU, the optimizer update) is not counted; XLA's cost
analysis counts it.
"""
import ml_collections

from caip_jax.data.schema import FEATURES_PER_KEYPOINT, NUM_HANDS, NUM_KEYPOINTS
from caip_jax.models.caip import tower_size


def _attention(n: int, n_kv: int, d: int) -> int:
    return 4 * n * d * d + 4 * n_kv * d * d + 4 * n * n_kv * d


def _block(n: int, d: int, m: int) -> int:
    return _attention(n, n, d) + 4 * n * d * m


def _pool(n: int, n_kv: int, d: int, m: int) -> int:
    return _attention(n, n_kv, d) + 4 * n * d * m


# Matmul FLOPs per sample that the backward pass of one block (n tokens, width d, MLP m) runs
# again under each model.remat_policy: what it needs and the policy did not keep.
_RECOMPUTED = {
    "none": lambda n, d, m: 0,
    "dots": lambda n, d, m: 0,  # every matmul output is kept
    # The two [n, n] attention products have batch dimensions, so they are not kept.
    "dots_no_batch": lambda n, d, m: 4 * n * n * d,
    # The whole block but its MLP's output matmul, whose result no gradient needs.
    "full": lambda n, d, m: _block(n, d, m) - 2 * n * d * m,
}


def _encoders(model: ml_collections.ConfigDict) -> list[tuple[int, int, int, int]]:
    """(depth, tokens, width, MLP width) of the image, text and action encoders."""
    size = tower_size(model)
    d, depth, m = size["width"], size["depth"], size["mlp_dim"]
    act = model.action
    return [
        (depth, (model.image_size // size["patch_size"]) ** 2, d, m),
        (depth, model.text.length, d, m),
        (act.depth, act.horizon + 1, act.width, act.mlp_dim),
    ]


def remat_flops_per_sample(model: ml_collections.ConfigDict) -> int:
    """Matmul FLOPs of one sample that `model.remat_policy` recomputes in the backward pass
    (the pooling and embeddings are not rematerialised)."""
    recomputed = _RECOMPUTED[model.remat_policy]
    return sum(depth * recomputed(n, d, m) for depth, n, d, m in _encoders(model))


def forward_flops_per_sample(model: ml_collections.ConfigDict, batch_size: int) -> dict[str, int]:
    """Forward matmul FLOPs of one sample by part (see the module docstring), for `model` (the
    `model` part of a run config) at global batch `batch_size`; `embeddings` is the part of
    `image` and `action` that takes the data as input."""
    image, text, action = [depth * _block(n, d, m) for depth, n, d, m in _encoders(model)]
    size = tower_size(model)
    d, m, patch = size["width"], size["mlp_dim"], size["patch_size"]
    n, length, act = (model.image_size // patch) ** 2, model.text.length, model.action
    m_pool = model.pool.mlp_dim or m
    patch_embedding = 2 * n * 3 * patch * patch * d
    action_embedding = 2 * act.horizon * (NUM_HANDS * NUM_KEYPOINTS * FEATURES_PER_KEYPOINT + NUM_HANDS) * act.width
    return dict(
        image=patch_embedding + image,
        text=text,
        pool=_pool(length, n, d, m_pool) + _pool(1, length, d, m_pool),
        action=action_embedding + action + 2 * act.width * d,
        loss=2 * batch_size * d,
        embeddings=patch_embedding + action_embedding,
    )


def train_flops_per_sample(model: ml_collections.ConfigDict, batch_size: int) -> int:
    """Forward + backward matmul FLOPs of one sample at global batch `batch_size`."""
    parts = forward_flops_per_sample(model, batch_size)
    forward = sum(parts[k] for k in ("image", "text", "pool", "action", "loss"))
    return 3 * forward - parts["embeddings"]
