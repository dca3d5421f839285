"""The tiny test model's sizes and config (tests/tiny.py builds its Hugging Face twins)."""
from caip_jax import config as caip_config

WIDTH, DEPTH, MLP_DIM, HEADS, PATCH, IMAGE_SIZE = 32, 2, 64, 4, 8, 32
VOCAB, TEXT_LEN = 100, 16


def tiny_model_config():
    """A CAIP model config small enough for CPU tests, in float32."""
    c = caip_config.model_config(f"mu/{PATCH}")
    c.width, c.depth, c.mlp_dim, c.num_heads = WIDTH, DEPTH, MLP_DIM, HEADS
    c.image_size = IMAGE_SIZE
    c.text.vocab_size, c.text.length = VOCAB, TEXT_LEN
    c.action.update(horizon=8, width=24, depth=2, mlp_dim=48, num_heads=3)
    c.dtype = "float32"
    return c
