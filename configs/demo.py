"""The bundled tiny default: a CAIP small enough to train on a laptop CPU in minutes."""
from caip_jax.config import base_config


def get_config():
    config = base_config("mu/8")
    model = config.model
    model.width, model.depth, model.mlp_dim, model.num_heads = 64, 2, 256, 4
    model.image_size = 64  # 8 x 8 patches
    model.text.update(vocab_size=1000, length=16)
    model.action.update(horizon=32, width=64, depth=2, mlp_dim=256, num_heads=4)
    model.dtype = "float32"
    return config
