"""The SigLIP 2 tokenizer against Hugging Face's, both reading one locally trained Gemma-style
sentencepiece model (nothing is downloaded)."""
import importlib
import shutil
import sys

import numpy as np
import pytest
import transformers
from google.protobuf.runtime_version import VersionError

from caip_jax.data.tokenizer import Tokenizer, train_sentencepiece

LENGTH = 64
CORPUS = [
    "a photo of a cat sitting on the mat",
    "the robot hand picks up the red cube and places it in the bowl",
    "pour water from the kettle into the cup, then put the kettle back",
    "open the drawer; take out the spoon (the small one) and close it!",
    "fold the towel twice and stack it on the others",
    "turn the knob 90 degrees to the left",
] * 20


def _sentencepiece_proto():
    """Lets transformers parse tokenizer.model here: constraints.txt pins protobuf 6.33.6, older
    than the generated code sentencepiece 0.2.3 ships (protobuf 7.36.1), so importing
    `sentencepiece.sentencepiece_model_pb2` fails; transformers' own copy of the same proto
    definition (for protobuf >= 4) reads the file."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except VersionError:
        sys.modules["sentencepiece.sentencepiece_model_pb2"] = importlib.import_module(
            "transformers.utils.sentencepiece_model_pb2_new"
        )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Hugging Face-style directory holding a freshly trained tokenizer.model."""
    directory = tmp_path_factory.mktemp("tokenizer")
    model = train_sentencepiece(CORPUS, str(directory / "gemma_style"), vocab_size=400)
    shutil.copy(model, directory / "tokenizer.model")
    return directory


def hf_tokenizer(cls, directory):
    """`cls` loaded from `directory` as SigLIP 2 sets it up (convert_siglip2_to_hf.py): no BOS,
    EOS appended, padding on the right."""
    _sentencepiece_proto()
    tokenizer = cls.from_pretrained(directory, add_bos_token=False, add_eos_token=True, padding_side="right")
    assert tokenizer.vocab_size == 400, "transformers built a placeholder vocabulary, not the trained one"
    return tokenizer


def hf_encode(tokenizer, texts):
    """As `Siglip2Processor` calls its tokenizer."""
    return np.array(tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"])


TEXTS = {
    "english": "A Photo of a CAT sitting on the Mat",
    "punctuation": "Hello, world! (Really?) -- yes; 'quotes' & \"more\"... #1: 42%",
    "whitespace": "  two  spaces\tand a tab ",
    "long": "The robot arm moves the cube to the left, " * 20,
    "accents": "Zürich café, naïve façade, smörgåsbord",
    "cjk": "一只猫坐在垫子上 ロボットの手",
    "emoji": "pick up the 🍎 and the 🤖",
}


def test_ids_equal_hf_siglip2_tokenizer(model_dir):
    """Siglip2Tokenizer lowercases by itself; these texts' capitals are all ASCII, where its
    Unicode lowercasing and big_vision's ASCII lowercasing agree."""
    ours = Tokenizer(str(model_dir)).encode(list(TEXTS.values()))
    reference = hf_tokenizer(transformers.Siglip2Tokenizer, model_dir)
    expected = hf_encode(reference, list(TEXTS.values()))
    for name, row, want in zip(TEXTS, ours, expected):
        np.testing.assert_array_equal(row, want, err_msg=name)
    assert ours.shape == (len(TEXTS), LENGTH) and ours.dtype == np.int32

    rows = dict(zip(TEXTS, ours))
    assert rows["long"][-1] == reference.eos_token_id and reference.pad_token_id not in rows["long"]
    english = rows["english"]
    assert list(english).count(reference.eos_token_id) == 1 and english[-1] == reference.pad_token_id
    assert reference.bos_token_id not in ours
    pieces = reference.convert_ids_to_tokens(rows["emoji"].tolist())
    assert "<0xF0>" in pieces, f"the emoji did not go through byte fallback: {pieces}"


def test_non_ascii_capitals_are_kept_as_big_vision_does(model_dir):
    """big_vision lowercases with tf.strings.lower (ASCII only; bytes.lower() does the same), so
    'É' stays; Siglip2Tokenizer would lower it. The ids equal GemmaTokenizer's (the class
    convert_siglip2_to_hf.py saves; it does not lowercase) on the ASCII-lowered text."""
    texts = ["ÉCOLE Über ΑΘΗΝΑ МОСКВА", "Ça Va"]
    ours = Tokenizer(str(model_dir)).encode(texts)
    ascii_lowered = [text.encode().lower().decode() for text in texts]
    assert ascii_lowered[0] == "École Über ΑΘΗΝΑ МОСКВА"
    gemma = hf_tokenizer(transformers.GemmaTokenizer, model_dir)
    np.testing.assert_array_equal(ours, hf_encode(gemma, ascii_lowered))
    unicode_lowered = hf_encode(hf_tokenizer(transformers.Siglip2Tokenizer, model_dir), texts)
    assert not np.array_equal(ours, unicode_lowered)


def test_model_file_directory_and_length(model_dir):
    from_file = Tokenizer(str(model_dir / "gemma_style.model"), length=8)
    from_dir = Tokenizer(str(model_dir), length=8)
    texts = ["a photo of a cat", TEXTS["long"], ""]
    np.testing.assert_array_equal(from_file.encode(texts), from_dir.encode(texts))
    ids = from_file.encode(texts)
    assert ids.shape == (3, 8)
    np.testing.assert_array_equal(ids[2], [1, 0, 0, 0, 0, 0, 0, 0])  # "" is just the EOS
    assert (from_file.vocab_size, from_file.pad_id, from_file.eos_id) == (400, 0, 1)
    gemma = hf_tokenizer(transformers.GemmaTokenizer, model_dir)
    assert [gemma.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]


def test_bad_inputs_are_refused(model_dir):
    with pytest.raises(FileNotFoundError, match="neither a sentencepiece .model file nor a directory"):
        Tokenizer(str(model_dir / "absent"))
    with pytest.raises(TypeError, match=r"wrap a single text as \[text\]"):
        Tokenizer(str(model_dir)).encode("a photo")
