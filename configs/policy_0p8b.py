"""The paper's policy size: a 0.8 B-parameter decoder (28 blocks, width 1536) trained from scratch
on frozen features, in bfloat16 on accelerators, its parameters split over fsdp."""
from caip_jax.policy.config import policy_config


def get_config():
    config = policy_config("0.8B")
    config.model.dtype = "bfloat16"
    config.mesh.update(data=1, fsdp=-1)
    config.batch_size = 256
    config.total_steps = 30_000
    config.optim.update(learning_rate=3e-4, warmup_steps=1000, weight_decay=0.01, b2=0.95)
    return config
