"""Default run configuration. The files in configs/ start from here and set what differs."""
import difflib
import math

import ml_collections

from caip_jax import optim


def model_config(variant: str = "L/16") -> ml_collections.ConfigDict:
    """The `model` part of a run config: SigLIP 2 towers of `variant`, the paper's action tower."""
    return ml_collections.ConfigDict(
        dict(
            # Image and text tower size and patch, in big_vision's names ('B/16', 'L/16',
            # 'So400m/16'); both towers share it, as in SigLIP 2.
            variant=variant,
            # Explicit tower sizes override the variant's (None: the variant's value).
            width=ml_collections.FieldReference(None, field_type=int),
            depth=ml_collections.FieldReference(None, field_type=int),
            mlp_dim=ml_collections.FieldReference(None, field_type=int),
            num_heads=ml_collections.FieldReference(None, field_type=int),
            image_size=256,
            # SigLIP 2's Gemma tokenizer: 256k ids, 64 tokens, pad id 0.
            text=dict(vocab_size=256_000, length=64, pad_id=0),
            # T = 64 future steps at 30 Hz; a lightweight 4-layer transformer with a [CLS] token.
            action=dict(horizon=64, width=512, depth=4, mlp_dim=2048, num_heads=8),
            # Both pooling stages; None: the tower's head count and MLP width.
            pool=dict(
                num_heads=ml_collections.FieldReference(None, field_type=int),
                mlp_dim=ml_collections.FieldReference(None, field_type=int),
            ),
            dtype="bfloat16",  # compute dtype; parameters are always float32
            remat_policy="none",  # one of caip_jax.models.common.REMAT_POLICIES
            # Each tower's blocks under nn.scan, parameters stacked [depth, ...]: XLA compiles one
            # block, not depth of them (pod configs). Checkpoints hold the layout they trained with.
            scan=False,
            t_init=math.log(10.0),  # log temperature of the sigmoid loss
            b_init=-10.0,
        )
    )


def base_config(variant: str = "L/16") -> ml_collections.ConfigDict:
    """A full run config for `variant`: the paper's setup, with pod-scale defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 100_000
    config.batch_size = 16_384  # global, over all processes and devices
    config.model = model_config(variant)
    config.loss = "ring"  # sigmoid loss over a ring of devices, or "dense" (the whole [B, B] matrix)
    config.data = ml_collections.ConfigDict(
        dict(
            # A record set directory (caip-make-records) or its TFDS version directory; or a
            # weighted mixture of named sets: "lab:0.3:/data/lab,wild:0.65:/data/wild,robot:0.05:/r".
            train="",
            tokenizer="",  # sentencepiece .model or HF tokenizer directory (SigLIP 2's Gemma)
            delta="anchor",  # action deltas against the anchor step, or "step" (k - 1)
            normalize=True,  # action mean/std from the record sets' stats.json
            stats="mixture",  # normalise with the mixture's statistics, or "per_source"
            workers=8,  # loader processes per host (grain); the batch order does not depend on it
            # A record set's absent or unreadable shards: "error" (naming them), or "skip": train
            # on the rest with a warning; what is lost is logged and kept in the checkpoint.
            missing_shards="error",
        )
    )
    # Device mesh: batch over data x fsdp, parameters over fsdp (and tensor); -1: the rest.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.optim = optim.optim_config()
    config.init = ml_collections.ConfigDict(
        dict(
            siglip2="",  # SigLIP 2 .npz or HF directory: the image and text towers start from it
            # With siglip2, t and b from SigLIP 2's image-text training too; False: the SigLIP
            # paper's start for a new pairing, model.t_init and model.b_init (log 10, -10).
            siglip2_logit_scalars=False,
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
    config.log = ml_collections.ConfigDict(dict(every_steps=50))
    # A non-finite loss, gradient norm or parameter: "stop" with an error naming the step (no
    # checkpoint of it is written), or "skip" the update and count it, stopping after
    # `max_consecutive` in a row.
    config.nonfinite = ml_collections.ConfigDict(dict(policy="stop", max_consecutive=10))
    # Compiled programs persist here ({workdir} is replaced), so a restart does not recompile;
    # a shared path serves every run of the same program; "" turns it off.
    config.compilation_cache = "{workdir}/compilation_cache"
    return config


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """None if `path` ('model.text.length') names a field of `config`; else a message naming
    the first unknown part, its full path and the closest valid names."""
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        parent = ".".join(["config", *parts[:depth]])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config.{path}: {parent} is a value ({node!r}), it has no field {part!r}"
        names = list(node.keys())
        initials = [n for n in names if "".join(w[0] for w in n.split("_") if w) == part]  # lr -> learning_rate
        close = initials + [n for n in difflib.get_close_matches(part, names, n=3, cutoff=0.5) if n not in initials]
        hint = f" did you mean {' or '.join(f'{parent}.{c}' for c in close)}?" if close else ""
        return f"config.{path}: {parent} has no field {part!r};{hint} its fields: {', '.join(sorted(names))}"
    return None
