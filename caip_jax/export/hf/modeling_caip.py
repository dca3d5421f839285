"""CAIP in plain PyTorch: the model that caip-jax's exporter writes next to its weights.

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    out = model(pixel_values=..., input_ids=..., action=..., action_mask=...)

Inputs: pixel_values [B, 3, S, S] in [-1, 1] (CAIPProcessor makes them), input_ids [B, L]
(right-padded with pad_token_id), and optionally action [B, T, 2, 21, 9] with action_mask
[B, T, 2]. It is a line-by-line transcription of caip_jax/models (Flax): the image and text
towers are SigLIP 2's (module names as in Hugging Face's SiglipModel), the action tower a small
transformer with a [CLS] token, and the image is pooled twice, each text token querying the
patches, then one learned probe over those per-token results with pads masked.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_caip import CAIPConfig


@dataclass
class CAIPOutput(ModelOutput):
    """image_pooled [B, D] text-conditioned image embedding; patch_features [B, N, D];
    text_tokens [B, L, D]; text_pooled [B, D]; image_map [B, D] (the image tower's own MAP
    head); action_embedding [B, D] when an action is given, and then logits_per_image [B, B]
    (image+text rows, action columns: exp(logit_scale) * cosine + logit_bias, as SiglipModel's)
    and logits_per_action, its transpose; with output_attentions, stage1_attention
    [B, H, L, N] (text tokens over patches) and stage2_attention [B, H, L] (probe over tokens)."""

    image_pooled: torch.Tensor | None = None
    patch_features: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    image_map: torch.Tensor | None = None
    action_embedding: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_action: torch.Tensor | None = None
    stage1_attention: torch.Tensor | None = None
    stage2_attention: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention from queries [B, Q, D] over tokens [B, N, D] -> [B, Q, D] and the
    weights [B, H, Q, N]. Logits and softmax in float32; masked tokens (mask [B, N], True =
    attend) get the most negative float, so a row with nothing to attend to is uniform."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, queries, tokens, mask=None):
        batch, width = queries.shape[0], queries.shape[-1]
        head_dim = width // self.heads
        split = lambda x: x.view(batch, x.shape[1], self.heads, head_dim).transpose(1, 2)  # [B, H, *, K]
        q, k, v = split(self.q_proj(queries)), split(self.k_proj(tokens)), split(self.v_proj(tokens))
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * head_dim**-0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1)
        out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).reshape(batch, -1, width)
        return self.out_proj(out), weights


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, mlp_dim: int, heads: int, eps: float):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.self_attn, self.mlp = Attention(width, heads), Mlp(width, mlp_dim)

    def forward(self, x):
        y = self.layer_norm1(x)
        x = x + self.self_attn(y, y)[0]
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, depth: int, width: int, mlp_dim: int, heads: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, mlp_dim, heads, eps) for _ in range(depth))

    @classmethod
    def of_towers(cls, c: CAIPConfig) -> "Encoder":
        """The encoder of the image or the text tower, which share one size (as SigLIP 2's)."""
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.layer_norm_eps)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class AttentionPool(nn.Module):
    """Attention of queries over tokens, then a residual MLP: [B, Q, D] -> [B, Q, D] and the
    weights [B, H, Q, N]. With `probe`, the query is one learned vector (SigLIP's MAP head)."""

    def __init__(self, width: int, mlp_dim: int, heads: int, eps: float, probe: bool):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width)) if probe else None
        self.attention = Attention(width, heads)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, tokens, queries=None, mask=None):
        if queries is None:
            queries = self.probe.expand(tokens.shape[0], -1, -1)
        x, weights = self.attention(queries, tokens, mask)
        return x + self.mlp(self.layernorm(x)), weights


class VisionEmbeddings(nn.Module):
    def __init__(self, config: CAIPConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2, d)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the patch grid
        return x + self.position_embedding.weight[None]


class VisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> patch tokens [B, N, D] and the MAP-pooled [B, D]."""

    def __init__(self, config: CAIPConfig):
        super().__init__()
        c = config
        self.embeddings = VisionEmbeddings(c)
        self.encoder = Encoder.of_towers(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = AttentionPool(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.layer_norm_eps, probe=True)

    def forward(self, pixel_values):
        x = self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
        return x, self.head(x)[0][:, 0]


class TextEmbeddings(nn.Module):
    def __init__(self, config: CAIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.text_length, config.hidden_size)

    def forward(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[None, : input_ids.shape[1]]


class TextTower(nn.Module):
    """input_ids [B, L] -> tokens [B, L, D] and the pooled [B, D]: SigLIP 2's text tower, which
    attends over every position (no pad mask) and pools the last one."""

    def __init__(self, config: CAIPConfig):
        super().__init__()
        c = config
        self.embeddings = TextEmbeddings(c)
        self.encoder = Encoder.of_towers(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, input_ids):
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        return x, self.head(x[:, -1])


class ActionTower(nn.Module):
    """action [B, T, 2, 21, 9], action_mask [B, T, 2] -> [B, D]. A missing hand contributes
    zeros whatever its values, and the mask itself is an input, so "absent" differs from
    "still"; a learned [CLS] token's final state is projected to the towers' width."""

    def __init__(self, config: CAIPConfig):
        super().__init__()
        c, w = config, config.action_hidden_size
        step_features = c.num_hands * c.num_keypoints * c.features_per_keypoint + c.num_hands
        self.embedding = nn.Linear(step_features, w)
        self.position_embedding = nn.Embedding(c.action_horizon, w)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.encoder = Encoder(c.action_num_hidden_layers, w, c.action_intermediate_size, c.action_num_attention_heads, c.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(w, eps=c.layer_norm_eps)
        self.head = nn.Linear(w, c.hidden_size)

    def forward(self, action, action_mask):
        batch, steps = action.shape[:2]
        dtype = self.embedding.weight.dtype
        mask = action_mask.to(dtype)
        x = action.to(dtype) * mask[:, :, :, None, None]
        x = torch.cat([x.reshape(batch, steps, -1), mask], dim=-1)
        x = self.embedding(x) + self.position_embedding.weight[None, :steps]
        x = torch.cat([self.cls.expand(batch, -1, -1), x], dim=1)
        x = self.final_layer_norm(self.encoder(x))
        return self.head(x[:, 0])


class TextConditionedPool(nn.Module):
    """Stage 1: each text token queries the patches; stage 2: a learned probe pools the
    per-token results, pads masked. -> pooled [B, D], weights [B, H, L, N] and [B, H, L]."""

    def __init__(self, config: CAIPConfig):
        super().__init__()
        c = config
        args = (c.hidden_size, c.pool_intermediate_size, c.pool_num_attention_heads, c.layer_norm_eps)
        self.cross_attention = AttentionPool(*args, probe=False)
        self.head = AttentionPool(*args, probe=True)

    def forward(self, patches, text_tokens, text_mask):
        per_token, stage1 = self.cross_attention(patches, queries=text_tokens)
        pooled, stage2 = self.head(per_token, mask=text_mask)
        return pooled[:, 0], stage1, stage2[:, :, 0]


def _require_shape(name: str, tensor: torch.Tensor, expected: tuple, fix: str) -> None:
    """Refuses `tensor` unless its shape is `expected` (None: any size, the batch). Positions are
    learned for one text length, horizon and image size: another would otherwise be cut to fit
    or fail deep inside, where the Flax model refuses it."""
    got = tuple(tensor.shape)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        wanted = ", ".join("B" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {list(got)}; this model takes [{wanted}]: {fix}")


class CAIPModel(PreTrainedModel):
    config_class = CAIPConfig
    base_model_prefix = "caip"
    main_input_name = "pixel_values"

    def __init__(self, config: CAIPConfig):
        super().__init__(config)
        self.vision_model = VisionTower(config)
        self.text_model = TextTower(config)
        self.action_model = ActionTower(config)
        self.pooling = TextConditionedPool(config)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the exported checkpoint; this only gives freshly built models
        (no checkpoint) finite values."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_image_features(self, pixel_values, input_ids, output_attentions: bool = False) -> CAIPOutput:
        """Everything but the action: image_pooled, patch_features, text_tokens, text_pooled,
        image_map (and both pooling attention maps with output_attentions)."""
        c = self.config
        _require_shape("pixel_values", pixel_values, (None, 3, c.image_size, c.image_size),
                       f"resize images to {c.image_size}x{c.image_size} (config.image_size), as CAIPProcessor does")
        _require_shape("input_ids", input_ids, (pixel_values.shape[0], c.text_length),
                       f"one text per image, padded or truncated to {c.text_length} ids (config.text_length), "
                       "as CAIPProcessor does")
        patch_features, image_map = self.vision_model(pixel_values)
        text_tokens, text_pooled = self.text_model(input_ids)
        image_pooled, stage1, stage2 = self.pooling(patch_features, text_tokens, input_ids != self.config.pad_token_id)
        return CAIPOutput(
            image_pooled=image_pooled,
            patch_features=patch_features,
            text_tokens=text_tokens,
            text_pooled=text_pooled,
            image_map=image_map,
            stage1_attention=stage1 if output_attentions else None,
            stage2_attention=stage2 if output_attentions else None,
        )

    def get_action_features(self, action, action_mask):
        """action [B, T, 2, 21, 9], action_mask [B, T, 2] -> action_embedding [B, D]."""
        c = self.config
        steps = (c.action_horizon, c.num_hands)
        _require_shape("action", action, (None, *steps, c.num_keypoints, c.features_per_keypoint),
                       f"chunks of {c.action_horizon} steps (config.action_horizon) of {c.num_hands} hands x "
                       f"{c.num_keypoints} keypoints x {c.features_per_keypoint} features")
        _require_shape("action_mask", action_mask, (action.shape[0], *steps),
                       "one True/False per action step and hand (True where the hand is present)")
        return self.action_model(action, action_mask)

    def forward(self, pixel_values, input_ids, action=None, action_mask=None, output_attentions=None):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        out = self.get_image_features(pixel_values, input_ids, output_attentions)
        if action is None:
            return out
        if action_mask is None:
            raise ValueError("action was given without action_mask [B, T, 2] (True where the hand is present)")
        action_embedding = self.get_action_features(action, action_mask)
        # float32 and the same epsilon as training's loss (caip_jax.loss.l2_normalize).
        normalize = lambda x: x.float() / (x.float().norm(dim=-1, keepdim=True) + 1e-8)
        cosine = normalize(out.image_pooled) @ normalize(action_embedding).t()
        logits = cosine * self.logit_scale.float().exp() + self.logit_bias.float()
        return CAIPOutput(**out, action_embedding=action_embedding, logits_per_image=logits, logits_per_action=logits.t())
