"""Default configuration of a policy run; configs/policy_*.py start from here."""
import ml_collections

from caip_jax import optim
from caip_jax.models.common import REMAT_POLICIES
from caip_jax.policy.model import HEADS

# Decoder sizes. "0.8B" is the paper's policy size (it trains Qwen3.5-0.8B from scratch): 28
# blocks of width 1536 and GELU MLP 6144 are 0.79 B parameters in our block (tested from shapes).
# The 0.8 B decoder runs its blocks under nn.scan (XLA compiles one block, not 28) with each
# block's activations recomputed in the backward pass but its weight matmuls kept
# ("dots_no_batch", as the CAIP pod configs); the tiny one unrolled, nothing recomputed.
SIZES = {
    "tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=256, scan=False, remat_policy="none"),
    "0.8B": dict(width=1536, depth=28, num_heads=16, mlp_dim=6144, scan=True, remat_policy="dots_no_batch"),
}
FEATURES = ("pooled", "patches")
# Flow times of training: "beta" is pi0's, t = 0.999 (1 - u) with u ~ Beta(1.5, 1), which puts
# more of the training on the noisy end (t = 0 is noise here); "uniform" is t ~ U(0, 1).
TIME_SAMPLING = ("beta", "uniform")


def policy_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """A policy run config with the decoder of SIZES[size]."""
    if size not in SIZES:
        raise ValueError(f"policy size {size!r} is not one of {sorted(SIZES)}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 2000
    config.batch_size = 64  # global
    config.model = ml_collections.ConfigDict(dict(SIZES[size], head="flow", dtype="float32"))
    # Action chunking: the policy predicts `horizon` future actions and the rollout executes the
    # first `execute` of them before it observes and predicts again.
    config.horizon = 8
    config.execute = 4
    config.flow_steps = 10  # Euler steps from noise to a chunk at inference
    config.time_sampling = "beta"
    # Which frozen features the decoder sees: the encoder's one pooled embedding (for CAIP the
    # text-conditioned image_pooled) or its patch tokens, projected.
    config.features = "pooled"
    # Each feature dimension standardised over the demonstrations' frames, as the state and the
    # actions are: encoders' scales differ by orders of magnitude (a simulator's raw positions,
    # an encoder's unit-norm embedding), and the decoder's optimiser is tuned for unit scale.
    config.normalize_features = True
    config.optim = optim.optim_config()
    config.optim.update(learning_rate=1e-3, warmup_fraction=0.05, weight_decay=1e-4, b2=0.999)
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Every error names the field and what would fix it."""
    model = config.model
    checks = (
        (config.total_steps >= 1, f"total_steps={config.total_steps} must be >= 1 (a policy needs training)"),
        (config.batch_size >= 1, f"batch_size={config.batch_size} must be >= 1"),
        (config.get("time_sampling", "uniform") in TIME_SAMPLING,
         f"time_sampling={config.get('time_sampling')!r} is not one of {TIME_SAMPLING}"),
        (model.get("remat_policy", "none") in REMAT_POLICIES,
         f"model.remat_policy={model.get('remat_policy')!r} is not one of {sorted(REMAT_POLICIES)}"),
        (model.head in HEADS, f"model.head={model.head!r} is not one of {HEADS}"),
        (config.features in FEATURES, f"features={config.features!r} is not one of {FEATURES}"),
        (model.width % model.num_heads == 0,
         f"model.width={model.width} is not divisible by model.num_heads={model.num_heads}"),
        (model.width % 2 == 0, f"model.width={model.width} must be even (the sinusoidal time embedding)"),
        (config.horizon >= 1, f"horizon={config.horizon} must be >= 1"),
        (1 <= config.execute <= config.horizon, f"execute={config.execute} must be in [1, horizon={config.horizon}]"),
        (config.flow_steps >= 1, f"flow_steps={config.flow_steps} must be >= 1"),
        (model.dtype in ("float32", "bfloat16"), f"model.dtype={model.dtype!r} is not 'float32' or 'bfloat16'"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
