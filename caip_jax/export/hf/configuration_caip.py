"""The configuration of CAIP's PyTorch model (Hugging Face `PretrainedConfig`).

Written by caip-jax's exporter from a training config; the field names follow SigLIP's
(`hidden_size`, `intermediate_size`, ...) for the image and text towers, which share one size.
"""
from transformers import PretrainedConfig


class CAIPConfig(PretrainedConfig):
    model_type = "caip"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        intermediate_size: int = 4096,
        num_attention_heads: int = 16,
        image_size: int = 256,
        patch_size: int = 16,
        vocab_size: int = 256_000,
        text_length: int = 64,
        pad_token_id: int = 0,
        action_horizon: int = 64,
        action_hidden_size: int = 512,
        action_num_hidden_layers: int = 4,
        action_intermediate_size: int = 2048,
        action_num_attention_heads: int = 8,
        pool_num_attention_heads: int = 16,
        pool_intermediate_size: int = 4096,
        num_hands: int = 2,
        num_keypoints: int = 21,
        features_per_keypoint: int = 9,
        layer_norm_eps: float = 1e-6,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.vocab_size = vocab_size
        self.text_length = text_length
        self.action_horizon = action_horizon
        self.action_hidden_size = action_hidden_size
        self.action_num_hidden_layers = action_num_hidden_layers
        self.action_intermediate_size = action_intermediate_size
        self.action_num_attention_heads = action_num_attention_heads
        self.pool_num_attention_heads = pool_num_attention_heads
        self.pool_intermediate_size = pool_intermediate_size
        self.num_hands = num_hands
        self.num_keypoints = num_keypoints
        self.features_per_keypoint = features_per_keypoint
        self.layer_norm_eps = layer_norm_eps
        super().__init__(pad_token_id=pad_token_id, **kwargs)
