"""Where the baselines look, as the paper compares them with CAIP: for SigLIP / SigLIP 2 the
attention of the image tower's learned probe (its MAP head) over the patches, for DINOv2 the
first principal component of each image's patch features (the DINOv2 paper's visualisation).
Both are one value per patch on the model's g x g grid, drawn like CAIP's saliency
(caip_jax.evaluate.saliency) on the same frames.

Models are Hugging Face directories run in PyTorch on the CPU:
- SigLIP and the fixed-resolution SigLIP 2 checkpoints (`SiglipModel` / `SiglipVisionModel`):
  the MAP head's nn.MultiheadAttention from its probe to the post-LayerNorm patch tokens,
  softmax weights averaged over heads: [N], summing to 1.
- DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`): the final-LayerNorm patch tokens (CLS and
  register tokens left out), centred per image, projected on their first principal component.
  A component's sign is arbitrary: it is turned so that the smaller side of the image (fewer
  patches), usually the objects rather than the background, is positive.

Frames are resized whole (no crop, so the map covers the frame) to the model's input size and
normalised with its image processor's mean and std.
"""
import dataclasses

import numpy as np

from caip_jax import storage
from caip_jax.evaluate import saliency

SUPPORTED = "SigLIP (SiglipModel, SiglipVisionModel; fixed-resolution SigLIP 2 checkpoints) or DINOv2 (Dinov2Model, Dinov2WithRegistersModel)"


@dataclasses.dataclass
class BaselineModel:
    """A loaded model: `method` "map_attention" or "pca"; `size` its input side in pixels."""

    name: str
    method: str
    model: object  # the vision transformer to run (torch.nn.Module)
    size: int
    mean: np.ndarray
    std: np.ndarray
    rescale: float
    register_tokens: int = 0

    @property
    def caption(self) -> str:
        return f"{self.name}: " + ("MAP-head attention" if self.method == "map_attention" else "patch PCA, 1st component")


def load(path: str, name: str | None = None) -> BaselineModel:
    """The model of a Hugging Face directory `path`; ValueError naming it if it is no model or
    not one of SUPPORTED."""
    import transformers

    if not storage.exists(storage.join(path, "config.json")):
        raise ValueError(f"--encoder hf:{path}: not a Hugging Face model directory (no config.json)")
    model = transformers.AutoModel.from_pretrained(path).eval()
    name = name or f"hf:{path.rstrip('/').split('/')[-1]}"
    if isinstance(model, (transformers.SiglipModel, transformers.SiglipVisionModel)):
        vision, method = vision_tower(model), "map_attention"
        if not getattr(vision, "use_head", True) or not hasattr(vision, "head"):
            raise ValueError(f"--encoder hf:{path}: this SigLIP vision tower has no MAP head (vision_use_head=False)")
        size = vision.config.image_size
    elif isinstance(model, (transformers.Dinov2Model, transformers.Dinov2WithRegistersModel)):
        vision, method = model, "pca"
        size = None
    else:
        kind = type(model).__name__
        hint = (" (NaFlex SigLIP 2 has no fixed patch grid: use a fixed-resolution checkpoint such as "
                "google/siglip2-base-patch16-256)") if kind.startswith("Siglip2") else ""
        raise ValueError(f"--encoder hf:{path} is a {kind}: baseline saliency supports {SUPPORTED}{hint}")
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    if size is None:  # DINOv2's processors crop: the crop is what the model sees
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size = (crop or {}).get("height") or processor.size.get("height") or processor.size.get("shortest_edge")
    return BaselineModel(name, method, vision, int(size), np.asarray(processor.image_mean, np.float32),
                         np.asarray(processor.image_std, np.float32), float(getattr(processor, "rescale_factor", 1 / 255)),
                         int(getattr(vision.config, "num_register_tokens", 0) or 0))


def vision_tower(model):
    """The module holding a SigLIP model's MAP head (`head`) and post-LayerNorm: SiglipModel's
    vision_model, SiglipVisionModel itself (transformers 5) or its vision_model (4.x)."""
    while not hasattr(model, "head") and hasattr(model, "vision_model"):
        model = model.vision_model
    return model


def pixel_values(model: BaselineModel, images: np.ndarray):
    """uint8 [B, S, S, 3] (already resized to model.size) -> the model's float tensor [B, 3, S, S]."""
    import torch

    x = (images.astype(np.float32) * model.rescale - model.mean) / model.std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def map_attention(vision, pixels) -> np.ndarray:
    """A SigLIP vision transformer's MAP-head attention [B, N]: the probe's softmax weights over
    the post-LayerNorm patch tokens, averaged over heads."""
    import torch

    with torch.no_grad():
        tokens = vision(pixel_values=pixels).last_hidden_state  # post_layernorm applied: the head's input
        probe = vision.head.probe.repeat(tokens.shape[0], 1, 1)
        _, weights = vision.head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=True)
    return weights[:, 0].float().numpy()


def first_component(patches: np.ndarray) -> np.ndarray:
    """patches [N, D] of one image -> [N]: the centred patches projected on their first
    principal component, the sign turned so that fewer patches are positive than negative."""
    centred = patches - patches.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    score = centred @ vt[0]
    if (score > 0).sum() > (score < 0).sum():
        score = -score
    return score.astype(np.float32)


def pca_maps(model: BaselineModel, pixels) -> np.ndarray:
    """DINOv2's per-image first principal component of the patch features [B, N]."""
    import torch

    with torch.no_grad():
        tokens = model.model(pixel_values=pixels).last_hidden_state[:, 1 + model.register_tokens:]
    return np.stack([first_component(t) for t in tokens.float().numpy()])


def patch_maps(model: BaselineModel, images: np.ndarray) -> np.ndarray:
    """uint8 [B, S, S, 3] at model.size -> one value per patch [B, N] (row-major g x g)."""
    pixels = pixel_values(model, images)
    return map_attention(model.model, pixels) if model.method == "map_attention" else pca_maps(model, pixels)


def tiles(model: BaselineModel, frames: list, display: int = 256) -> list[np.ndarray]:
    """Frames (image files, JPEG bytes or PIL images, as caip-saliency reads them) -> a uint8
    [display, display, 3] tile each: the frame with the model's map overlaid."""
    images = saliency.load_frames(frames, model.size)
    return [saliency.overlay_patches(image, weights, display) for image, weights in zip(images, patch_maps(model, images))]


def check_specs(specs: list[str]) -> list[str]:
    """caip-saliency's --encoder values -> their paths; ValueError naming one that is not
    `hf:PATH` of a directory with a config.json (checked before any work)."""
    paths = []
    for spec in specs:
        if not spec.startswith("hf:"):
            raise ValueError(f"--encoder {spec!r}: give hf:PATH, a Hugging Face SigLIP / SigLIP 2 or DINOv2 directory")
        if not storage.exists(storage.join(spec[3:], "config.json")):
            raise ValueError(f"--encoder {spec!r}: {spec[3:]} is not a Hugging Face model directory (no config.json)")
        paths.append(spec[3:])
    return paths


def draw(specs: list[str], frames: list, display: int, out: str) -> list[tuple[list[np.ndarray], list[str]]]:
    """Each baseline of `specs` (hf:PATH) on `frames`: its tiles, written to `out` as
    `<model>_<i>.png`, and their captions -> [(tiles, captions)], one entry per model."""
    rows = []
    for path in check_specs(specs):
        model = load(path)
        drawn = tiles(model, frames, display)
        slug = model.name.replace("hf:", "").replace("/", "-")
        for i, tile in enumerate(drawn):
            saliency.save_png(tile, storage.join(out, f"{slug}_{i:03d}.png"))
        rows.append((drawn, [model.caption] * len(drawn)))
    return rows


def sheet(caip_tiles: list[np.ndarray], texts: list[str], rows: list[tuple[list[np.ndarray], list[str]]]) -> np.ndarray:
    """One contact sheet: CAIP's tiles (captioned by their instruction) in the first row, then a
    row per baseline model on the same frames, column j always frame j."""
    tiles, captions = list(caip_tiles), [f"CAIP: {t}" if rows else t for t in texts]
    for drawn, labels in rows:
        tiles += drawn
        captions += labels
    return saliency.contact_sheet(tiles, captions, columns=len(caip_tiles) if rows else 4)
