"""The bundled tiny default: a CAIP small enough to train on a laptop CPU in minutes, on the
procedural demo world (caip-demo makes its records and tokenizer and fills data.train and
data.tokenizer)."""
from caip_jax.config import base_config


def get_config():
    config = base_config("mu/8")
    model = config.model
    model.width, model.depth, model.mlp_dim, model.num_heads = 64, 2, 256, 4
    model.image_size = 64  # 8 x 8 patches
    model.text.update(vocab_size=1000, length=16)
    model.action.update(horizon=32, width=64, depth=2, mlp_dim=256, num_heads=4)
    model.dtype = "float32"
    config.total_steps = 400
    config.batch_size = 32
    config.data.workers = 0
    config.optim.learning_rate = 1e-3  # from scratch, not from SigLIP 2
    config.optim.warmup_steps = 40
    config.checkpoint.every_steps = 200
    config.log.every_steps = 25
    return config
