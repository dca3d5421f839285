"""The exported Hugging Face processor, saved and loaded back through AutoProcessor's remote-code
path, against the preprocessing training uses (Tokenizer.encode, Preprocess.image)."""
import io
import os
import pickle
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from PIL import Image
from transformers import dynamic_module_utils

from caip_jax.data.pipeline import Preprocess
from caip_jax.data.tokenizer import Tokenizer, train_sentencepiece
from caip_jax.device_prep import color_jitter
from caip_jax.export.hf import processing_caip
from caip_jax.export.hf.processing_caip import CAIPProcessor

SIZE, LENGTH = 32, 16
CORPUS = ["pick up the red cup", "open the drawer; take out the spoon (the small one)!", "put it back"] * 20
TEXTS = [
    "pick up the red cup",
    "PICK Up The RED Cup",
    "École Ü",
    "open the drawer; take out the spoon (the small one)!",
    "pick up the red cup and put it back " * 5,  # cut to LENGTH
    "",
]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("spm") / "spm"), 300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm):
    directory = str(tmp_path_factory.mktemp("export"))
    CAIPProcessor(spm, SIZE, LENGTH).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_modules"))


@pytest.fixture(scope="module")
def loaded(exported, modules_cache):
    """AutoProcessor's object, its class imported from the exported processing_caip.py. The
    module copy goes to a temporary cache, not ~/.cache/huggingface/modules: transformers reads
    HF_MODULES_CACHE when first imported (other test files import it before this one runs), so
    its module global is patched, and the sys.path entry it appends is undone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", modules_cache)
        patch.setattr(sys, "path", list(sys.path))
        return transformers.AutoProcessor.from_pretrained(exported, trust_remote_code=True)


@pytest.fixture(scope="module")
def preprocess(spm):
    return Preprocess(spm, SIZE, LENGTH, horizon=1)


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scaled(uint8_hwc: np.ndarray) -> np.ndarray:
    """[S, S, 3] uint8 -> [3, S, S] float32, the formula written out."""
    return (uint8_hwc.astype(np.float32) / np.float32(255) * 2 - 1).transpose(2, 0, 1)


def test_autoprocessor_loads_the_exported_module(exported, loaded, modules_cache, spm):
    assert sorted(os.listdir(exported)) == [
        "preprocessor_config.json", "processing_caip.py", "processor_config.json", "tokenizer.model"
    ]
    cls = type(loaded)
    assert cls.__name__ == "CAIPProcessor" and cls is not CAIPProcessor
    assert cls.__module__.startswith("transformers_modules.")
    assert sys.modules[cls.__module__].__file__.startswith(modules_cache)
    assert isinstance(loaded, sys.modules[cls.__module__].CAIPProcessor)
    with open(processing_caip.__file__, "rb") as a, open(os.path.join(exported, "processing_caip.py"), "rb") as b:
        assert a.read() == b.read()
    with open(spm, "rb") as a, open(os.path.join(exported, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    assert (loaded.image_size, loaded.text_length, loaded.pad_id, loaded.eos_id) == (SIZE, LENGTH, 0, 1)


def test_resaving_the_loaded_processor_writes_the_same_files(exported, loaded, tmp_path):
    loaded.save_pretrained(str(tmp_path))
    for name in os.listdir(exported):
        with open(os.path.join(exported, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("text", TEXTS)
def test_input_ids_equal_training_tokenizer(loaded, spm, text):
    ids = loaded(text=text)["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, LENGTH)
    np.testing.assert_array_equal(ids, Tokenizer(spm, LENGTH).encode([text]))


def test_input_ids_edge_cases(loaded, spm):
    ids = lambda text: loaded(text=text)["input_ids"][0]
    np.testing.assert_array_equal(ids(""), [1] + [0] * (LENGTH - 1))  # EOS, then pads
    pieces = sentencepiece.SentencePieceProcessor(model_file=spm).encode(TEXTS[4])
    assert len(pieces) > LENGTH
    np.testing.assert_array_equal(ids(TEXTS[4]), pieces[: LENGTH - 1] + [1])  # cut, EOS kept last
    # Only ASCII capitals are lowered, as big_vision's tf.strings.lower.
    np.testing.assert_array_equal(ids("ÉCOLE Ü"), ids("École Ü"))
    assert not np.array_equal(ids("École Ü"), ids("école ü"))
    np.testing.assert_array_equal(ids("PICK Up The RED Cup"), ids("pick up the red cup"))


def test_text_batch_equals_rows(loaded):
    batch = loaded(text=TEXTS)["input_ids"]
    assert batch.shape == (len(TEXTS), LENGTH)
    for row, text in zip(batch, TEXTS):
        np.testing.assert_array_equal(row, loaded(text=text)["input_ids"][0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pixel_values_equal_training_images(loaded, preprocess, mode):
    image = random_image(mode, 70, 45)
    expected = preprocess.image(png(image), None)  # training reads encoded frames
    assert expected.shape == (SIZE, SIZE, 3)
    pixels = loaded(images=image)["pixel_values"]
    assert pixels.dtype == np.float32 and pixels.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_array_equal(pixels[0], scaled(expected))


def test_pixel_values_of_an_array(loaded, preprocess):
    array = np.asarray(random_image("RGB", 50, 81, seed=1))
    np.testing.assert_array_equal(loaded(images=array)["pixel_values"][0], scaled(preprocess.image(array, None)))


def test_pixel_values_match_device_colour_step(loaded, preprocess):
    """The device's colour step with unit factors computes the same values, up to its rounding."""
    image = random_image("RGB", 64, 48, seed=2)
    uint8 = preprocess.image(png(image), None)
    device = np.asarray(color_jitter(jnp.asarray(uint8[None]), jnp.ones((1, 3), jnp.float32)))[0]
    np.testing.assert_allclose(loaded(images=image)["pixel_values"][0], device.transpose(2, 0, 1), rtol=0, atol=3e-7)


def test_image_batch_equals_rows(loaded):
    images = [random_image("RGB", 70, 45, 3), random_image("L", 20, 33, 4), np.asarray(random_image("RGBA", 40, 40, 5))]
    batch = loaded(images=images)["pixel_values"]
    assert batch.shape == (3, 3, SIZE, SIZE)
    for row, image in zip(batch, images):
        np.testing.assert_array_equal(row, loaded(images=image)["pixel_values"][0])
    stack = np.stack([np.asarray(random_image("RGB", 30, 20, seed)) for seed in range(2)])  # [B, H, W, 3]
    np.testing.assert_array_equal(loaded(images=stack)["pixel_values"], loaded(images=list(stack))["pixel_values"])


def test_model_card_call(loaded):
    """The call of the model card's snippet."""
    image = random_image("RGBA", 96, 64).convert("RGB")
    inputs = loaded(images=image, text="pick up the red cup", return_tensors="pt")
    assert isinstance(inputs, transformers.BatchFeature) and set(inputs) == {"pixel_values", "input_ids"}
    assert inputs["pixel_values"].dtype == torch.float32 and inputs["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert inputs["input_ids"].dtype == torch.int64 and inputs["input_ids"].shape == (1, LENGTH)
    plain = loaded(images=image, text="pick up the red cup")
    np.testing.assert_array_equal(inputs["pixel_values"].numpy(), plain["pixel_values"])
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), plain["input_ids"])


def test_pickles_and_rejects_bad_input(spm, exported):
    processor = CAIPProcessor(spm, SIZE, LENGTH)
    copy = pickle.loads(pickle.dumps(processor))
    np.testing.assert_array_equal(copy(text=TEXTS)["input_ids"], processor(text=TEXTS)["input_ids"])
    with pytest.raises(ValueError, match="images=, text="):
        processor()
    with pytest.raises(TypeError, match="uint8"):
        processor(images=np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="string"):
        processor(text=[1, 2])
    with pytest.raises(TypeError, match="image_size"):
        CAIPProcessor.from_pretrained(exported, image_size=64)
