"""CAIP's input processing for the exported PyTorch model: images -> `pixel_values`, texts ->
`input_ids`, camera-frame hand poses -> `action` and `action_mask`, exactly as training and
evaluation prepare them for the JAX model.

This file is copied into the exported model directory and run from there by transformers
(`AutoProcessor.from_pretrained(directory, trust_remote_code=True)`), so it imports only the
standard library, numpy, PIL, sentencepiece and transformers, and repeats what caip_jax does
instead of importing it:

- image (caip_jax.data.pipeline.Preprocess.image without augmentation, then
  caip_jax.device_prep.color_jitter with unit factors): `.convert("RGB")` (alpha dropped,
  greyscale repeated), the whole frame resized to S x S by PIL's bilinear filter (the aspect
  ratio is not kept), then `x / 255 * 2 - 1` in float32, channels first: [3, S, S] in [-1, 1].
  color_jitter's identity blends round differently, so the device's values may differ from
  these by a few float32 ulps (at most 2.4e-7 measured on CPU).
- text (caip_jax.data.tokenizer.Tokenizer, big_vision's SigLIP 2 text preprocessing): only
  ASCII capitals lowered ('É' stays 'É'), sentencepiece ids without BOS, the EOS appended and
  kept last when a text is cut to L ids, then the pad id to the right up to L. There is no
  attention mask: the text tower sees the pads and pools the last position.
- action (caip_jax.actions.action_chunk, then caip_jax.actions.normalize with the checkpoint's
  statistics, as caip_jax.device_prep.action_chunks does inside the training step): invalid
  hand-frames become the identity; step k = 1..T against r = 0 (delta "anchor") or k - 1
  ("step"): p_k - p_r, then columns 0 and 1 of R_k R_r^T; valid where both k and r are; then
  (x - mean) / std with std 0 taken as 1, and masked entries 0. Training computes the chunk
  from the records' int16 pose offsets, so its chunks differ from these exact ones by that
  quantisation (at most scale / 65534 per translation axis, about 0.005 degrees per rotation).

The directory holds processor_config.json ({"image_size": S, "text_length": L,
"action_stats": "action_stats.json" or null} and the auto_map that points AutoProcessor here),
tokenizer.model, action_stats.json (the run's delta mode, horizon and mean/std per source;
absent for a model exported from a checkpoint without them) and this file; `save_pretrained`
writes them all.
"""
import json
import os
import shutil
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece
from PIL import Image
from transformers import BatchFeature
from transformers.utils import cached_file

PROCESSOR_CONFIG = "processor_config.json"  # the file AutoProcessor reads first
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_MODEL = "tokenizer.model"
ACTION_STATS = "action_stats.json"
POSE_SHAPE = (2, 21, 4, 4)  # hands, keypoints, camera-from-keypoint SE(3)
MODULE = os.path.splitext(os.path.basename(__file__))[0]

# Keyword arguments that only say where a directory or Hub repo's files are.
_FILE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class CAIPProcessor:
    """`processor(images=..., text=..., poses=..., valid=..., source=..., return_tensors="pt")`
    -> BatchFeature with `pixel_values` [B, 3, S, S] float32, `input_ids` [B, L] int64 and
    `action` [B, T, 2, 21, 9] float32 with `action_mask` [B, T, 2] bool, each where asked for.

    A plain class rather than a transformers ProcessorMixin: the mixin wants its parts to be
    transformers tokenizers and image processors (it loads them with AutoTokenizer and
    serialises them by their own configs), and this tokenizer is sentencepiece itself, so
    that the ids are exactly the ones training used.
    """

    model_input_names = ["pixel_values", "input_ids", "action", "action_mask"]
    _auto_class = None

    def __init__(self, tokenizer_file: str, image_size: int, text_length: int, action_stats: dict | None = None):
        """`tokenizer_file`: the sentencepiece .model the model was trained with (or a directory
        holding it as tokenizer.model); `image_size`: S; `text_length`: L (SigLIP 2: 64);
        `action_stats`: the checkpoint's action normalisation ({"delta", "horizon", "normalize",
        "stats", "sources": {name: {"mean", "std"} [2][21][9]}}), None if it has none."""
        if os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, TOKENIZER_MODEL)
        if int(image_size) < 1 or int(text_length) < 1:
            raise ValueError(
                f"image_size={image_size}, text_length={text_length}: both must be positive "
                "(a text needs at least one position, its EOS)"
            )
        self.image_size, self.text_length = int(image_size), int(text_length)
        self.action_stats = action_stats
        if action_stats is not None:
            self._mean, self._std = _stats_arrays(action_stats)
        with open(tokenizer_file, "rb") as f:
            self._model_proto = f.read()
        self._load_tokenizer()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{tokenizer_file}: the sentencepiece model has no pad or no EOS piece (pad_id="
                f"{self.pad_id}, eos_id={self.eos_id}); give the model CAIP was trained with"
            )

    def _load_tokenizer(self):
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)

    # Pickled (e.g. into DataLoader workers) as the model's bytes; sentencepiece's object is rebuilt.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load_tokenizer()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, text_length={self.text_length}, "
            f"vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"
        )

    def __call__(self, images=None, text=None, poses=None, valid=None, source=None, return_tensors=None) -> BatchFeature:
        """`images`: a PIL image or an [H, W], [H, W, 3] or [H, W, 4] uint8 array, or a list of
        them (or a [B, H, W, C] uint8 array); `text`: a string or a list of strings; `poses`,
        `valid`, `source`: as `actions`; `return_tensors`: None or "np" (numpy arrays), "pt"
        (torch tensors)."""
        if images is None and text is None and poses is None:
            raise ValueError("give images=, text=, poses= (with valid=) or several")
        data = {}
        if images is not None:
            data["pixel_values"] = self.preprocess_images(images)
        if text is not None:
            data["input_ids"] = self.tokenize(text)
        if poses is not None or valid is not None or source is not None:
            data.update(self.actions(poses, valid, source))
        return BatchFeature(data, tensor_type=return_tensors)

    def actions(self, poses, valid, source: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Camera-frame hand poses [T+1, 2, 21, 4, 4] (camera-from-keypoint SE(3), the anchor's
        camera, step 0 the anchor) and validity [T+1, 2] bool, or batches of them [B, T+1, ...]
        -> {"action": [B, T, 2, 21, 9] float32, "action_mask": [B, T, 2] bool}, normalised with
        the statistics of `source` (one name, or one per row; needed when the run normalised
        per source). Invalid hand-frames may hold anything, NaN included."""
        stats = self._require_stats()
        steps = stats["horizon"] + 1
        if poses is None or valid is None:
            raise ValueError("give both poses= [T+1, 2, 21, 4, 4] and valid= [T+1, 2] (True where the hand is tracked)")
        poses, valid = np.asarray(poses, np.float64), np.asarray(valid)
        if poses.ndim == 5:
            poses, valid = poses[None], valid[None]
        if poses.ndim != 6 or poses.shape[1:] != (steps, *POSE_SHAPE):
            raise ValueError(
                f"poses of shape {poses.shape}: give [T+1, 2, 21, 4, 4] or [B, T+1, 2, 21, 4, 4] with "
                f"T+1={steps} (the model's horizon {stats['horizon']} steps after the anchor)"
            )
        if valid.dtype != bool or valid.shape != poses.shape[:3]:
            raise ValueError(
                f"valid of dtype {valid.dtype} and shape {valid.shape}: give bool {poses.shape[1:3]} "
                f"(or {poses.shape[:3]}), one per pose step and hand, True where the hand is tracked"
            )
        broken = valid & ~np.isfinite(poses).all((-3, -2, -1))
        if broken.any():
            raise ValueError(
                f"poses[{', '.join(map(str, np.argwhere(broken)[0]))}] (batch, step, hand) is marked valid but holds NaN or inf: "
                "mark it False in valid"
            )
        mean, std = self._source_stats(source, len(poses))
        # caip_jax.actions.action_chunk and normalize, repeated: the export runs without caip_jax.
        poses = np.where(valid[..., None, None, None], poses, np.eye(4))
        rot, trans = poses[..., :3, :3], poses[..., :3, 3]
        ref = slice(0, 1) if stats["delta"] == "anchor" else slice(0, -1)
        rel = rot[:, 1:] @ np.swapaxes(rot[:, ref], -1, -2)
        action = np.concatenate([trans[:, 1:] - trans[:, ref], rel[..., :, 0], rel[..., :, 1]], -1).astype(np.float32)
        mask = valid[:, ref] & valid[:, 1:]
        if stats["normalize"]:
            action = (action.astype(np.float64) - mean[:, None]) / np.where(std == 0, 1.0, std)[:, None]
        return dict(action=np.where(mask[..., None, None], action, 0).astype(np.float32), action_mask=mask)

    def _require_stats(self) -> dict:
        if self.action_stats is None:
            raise ValueError(
                "this export holds no action statistics (it was exported from a checkpoint without them, "
                "an imported step 0), so raw poses cannot be normalised as training did: export a step that "
                "caip-train wrote (caip-export-torch --step N), or pass action= and action_mask= to the model yourself"
            )
        return self.action_stats

    def _source_stats(self, source, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """`source` (None, a name, or B names) -> mean, std [B, 2, 21, 9]."""
        names = list(self.action_stats["sources"])
        if source is None and self.action_stats["stats"] == "per_source" and self.action_stats["normalize"]:
            raise ValueError(f"the model was trained with statistics per source: pass source= one of {names}")
        if source is None:  # every source has the mixture's statistics, or none are used
            rows = [names[0]] * batch
        else:
            rows = [source] * batch if isinstance(source, str) else list(source)
        unknown = [name for name in rows if name not in names]
        if unknown or len(rows) != batch:
            raise ValueError(
                f"source={source!r}: give one of {names}, or a list of {batch} of them (one per row)"
            )
        index = [names.index(name) for name in rows]
        return self._mean[index], self._std[index]

    def preprocess_images(self, images) -> np.ndarray:
        """One image or a list of them -> [B, 3, S, S] float32 in [-1, 1]."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("images is an empty list")
        pixels = np.stack([self._resize(image) for image in images])  # [B, S, S, 3] uint8
        scaled = pixels.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
        return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))

    def _resize(self, image) -> np.ndarray:
        """One image -> [S, S, 3] uint8, as caip_jax.data.pipeline.Preprocess.image(image, None)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise TypeError(
                    f"an image array of dtype {image.dtype} and shape {image.shape}: give uint8 "
                    "[H, W], [H, W, 3] or [H, W, 4] (or a PIL image)"
                )
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"an image of type {type(image).__name__}: give a PIL image or a uint8 numpy array")
        size = (self.image_size, self.image_size)
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))

    def tokenize(self, text: str | Sequence[str]) -> np.ndarray:
        """One text or a list of them -> [B, L] int64 ids, as caip_jax.data.tokenizer.Tokenizer."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text={text!r}: give a string or a non-empty list of strings")
        pieces = self._sp.encode([t.translate(_ASCII_LOWER) for t in texts])
        ids = np.full((len(texts), self.text_length), self.pad_id, np.int64)
        for row, tokens in zip(ids, pieces):
            tokens = tokens[: self.text_length - 1] + [self.eos_id]  # a cut text keeps its EOS last
            row[: len(tokens)] = tokens
        return ids

    def save_pretrained(self, save_directory: str) -> list[str]:
        """Writes processor_config.json, preprocessor_config.json, tokenizer.model, this file
        and (if it has them) action_stats.json into `save_directory`; returns their paths."""
        os.makedirs(save_directory, exist_ok=True)
        config, image_config, model, module = (
            os.path.join(save_directory, name)
            for name in (PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG, TOKENIZER_MODEL, MODULE + ".py")
        )
        with open(config, "w") as f:
            json.dump(
                {
                    "processor_class": type(self).__name__,
                    "auto_map": {"AutoProcessor": f"{MODULE}.{type(self).__name__}"},
                    "image_size": self.image_size,
                    "text_length": self.text_length,
                    "action_stats": None if self.action_stats is None else ACTION_STATS,
                },
                f,
                indent=2,
            )
            f.write("\n")
        # The image half in Hugging Face image-processor terms, for readers that look for it:
        # (x / 255 - 0.5) / 0.5 is x / 255 * 2 - 1. Loading reads processor_config.json only.
        with open(image_config, "w") as f:
            json.dump(
                {
                    "processor_class": type(self).__name__,
                    "auto_map": {"AutoProcessor": f"{MODULE}.{type(self).__name__}"},
                    "do_resize": True,
                    "size": {"height": self.image_size, "width": self.image_size},
                    "resample": int(Image.Resampling.BILINEAR),
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                },
                f,
                indent=2,
            )
            f.write("\n")
        with open(model, "wb") as f:
            f.write(self._model_proto)
        if not (os.path.exists(module) and os.path.samefile(__file__, module)):
            shutil.copyfile(__file__, module)
        written = [config, image_config, model, module]
        if self.action_stats is not None:
            written.append(os.path.join(save_directory, ACTION_STATS))
            with open(written[-1], "w") as f:
                json.dump(self.action_stats, f)
                f.write("\n")
        return written

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> "CAIPProcessor":
        """Loads a directory (or Hub repo) that `save_pretrained` wrote. `kwargs`: where its
        files are (cache_dir, revision, local_files_only, ...); AutoProcessor's own private
        arguments and trust_remote_code are ignored."""
        where = {k: kwargs.pop(k) for k in _FILE_KWARGS if k in kwargs}
        unknown = [k for k in kwargs if not k.startswith("_") and k not in ("trust_remote_code", "code_revision")]
        if unknown:
            raise TypeError(
                f"unexpected arguments {unknown}: image_size and text_length are fixed by the "
                f"trained model; edit {PROCESSOR_CONFIG} only if the model was trained so"
            )
        with open(cached_file(pretrained_model_name_or_path, PROCESSOR_CONFIG, **where)) as f:
            config = json.load(f)
        action_stats = None
        if config.get("action_stats"):
            with open(cached_file(pretrained_model_name_or_path, config["action_stats"], **where)) as f:
                action_stats = json.load(f)
        return cls(
            tokenizer_file=cached_file(pretrained_model_name_or_path, TOKENIZER_MODEL, **where),
            image_size=config["image_size"],
            text_length=config["text_length"],
            action_stats=action_stats,
        )

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor"):
        """Called by AutoProcessor on the class it loaded from the model directory."""
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__


def _stats_arrays(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """action_stats.json's dict -> mean, std [S, 2, 21, 9] float32 in its sources' order."""
    if stats.get("delta") not in ("anchor", "step") or not stats.get("sources"):
        raise ValueError(
            f"action statistics with delta={stats.get('delta')!r} and sources {list(stats.get('sources') or [])}: "
            f"{ACTION_STATS} must name delta 'anchor' or 'step' and at least one source (export it again)"
        )
    arrays = tuple(np.array([entry[k] for entry in stats["sources"].values()], np.float32) for k in ("mean", "std"))
    if arrays[0].shape[1:] != (2, 21, 9) or arrays[1].shape != arrays[0].shape:
        raise ValueError(f"{ACTION_STATS}: mean and std must be [2][21][9] per source, got {arrays[0].shape[1:]}, {arrays[1].shape[1:]}")
    return arrays
