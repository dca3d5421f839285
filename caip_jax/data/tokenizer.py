"""SigLIP 2's text preprocessing: lowercase, Gemma sentencepiece ids, sticky EOS, 64 tokens.

What SigLIP 2 does, and where that is written:

- big_vision's SigLIP 2 demo colab (big_vision/configs/proj/image_text/SigLIP2_demo.ipynb)
  tokenizes with `lower(key="text")|tok(length=64, model="gemma", bos="no", eos="sticky")`,
  noting that "the siglip models work best with lowercase texts"; README_siglip2.md: the
  checkpoints differ from SigLIP's only in the 256k vocabulary and the Gemma tokenizer.
- `lower` (big_vision/pp/ops_text.py) is `tf.strings.lower(text)` with the default encoding
  '', which TensorFlow documents as ASCII: only A-Z are lowered, so 'ÉCOLE' becomes 'École'.
- `tok` (big_vision/pp/proj/paligemma/ops.py) is sentencepiece's `EncodeAsIds` with no BOS and
  the EOS id appended, then `tolen(64, sticky_end=True)`: a sequence of 64 or more ids keeps
  its first 63 and the EOS as the last; a shorter one is padded on the right with the pad id.
  The "gemma" model is gs://big_vision/gemma_tokenizer.model: pad 0, eos 1, bos 2, unk 3
  (Gemma's tokenizer_config.json lists the same ids).
- Hugging Face: convert_siglip2_to_hf.py saves a GemmaTokenizerFast with
  `add_bos_token=False, add_eos_token=True, padding_side="right"`, and `Siglip2Processor`
  calls it with `padding="max_length", truncation=True, max_length=64`; its truncation happens
  before the EOS is added, so the EOS stays last, as big_vision's sticky EOS.
  `Siglip2Tokenizer` (transformers PR 43101) lowercases with Unicode rules, so it differs from
  big_vision on capitals outside ASCII ('É', 'Ü', Greek, Cyrillic); `GemmaTokenizer`, the
  class the conversion script saves, does not lowercase at all. This module follows big_vision,
  the preprocessing the released weights were trained with.

The text tower sees the pads (no mask) and pools the last position, so the fixed length and
the right padding are part of the model's input, not a batching detail.
"""
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece
from etils import epath

from caip_jax import storage

# big_vision's `lower`: ASCII letters only (tf.strings.lower with its default encoding '').
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def model_proto(path: str) -> bytes:
    """The bytes of a sentencepiece .model file, or of the tokenizer.model inside a Hugging Face
    directory; local or remote (gs://: sentencepiece opens local files only, so it is given the
    bytes)."""
    candidate = storage.join(path, "tokenizer.model") if path and epath.Path(path).is_dir() else path
    try:
        return storage.read_bytes(candidate)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise FileNotFoundError(
            f"{path!r} is neither a sentencepiece .model file nor a directory holding "
            "tokenizer.model (as the Hugging Face SigLIP 2 and Gemma repos do)"
        ) from error


class Tokenizer:
    """Texts -> SigLIP 2 text-tower input: `encode(texts)` gives [B, length] int32 ids."""

    def __init__(self, path: str, length: int = 64):
        """`path`: a sentencepiece .model file or a Hugging Face tokenizer directory;
        `length`: the token count of every encoded text (SigLIP 2: 64)."""
        if length < 1:
            raise ValueError(f"length={length}: a text needs at least one position (its EOS)")
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto(path))
        self.length = length
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{path}: the sentencepiece model has no pad or no EOS piece (pad_id={self.pad_id}, "
                f"eos_id={self.eos_id}); SigLIP 2 needs both (Gemma: pad 0, eos 1)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """B texts -> ids [B, length] int32: ASCII-lowercased, no BOS, EOS last even when the
        text is cut, pads (`pad_id`) on the right. The exported processor
        (caip_jax/export/hf/processing_caip.py) repeats this, as it must run without caip_jax;
        tests/test_processing.py holds the two equal."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text as [text]")
        pieces = self._sp.encode([text.translate(_ASCII_LOWER) for text in texts])
        ids = np.full((len(pieces), self.length), self.pad_id, np.int32)
        for row, tokens in zip(ids, pieces):
            tokens = tokens[: self.length - 1] + [self.eos_id]
            row[: len(tokens)] = tokens
        return ids


def train_sentencepiece(texts: Sequence[str], model_prefix_or_path: str, vocab_size: int) -> str:
    """Trains a small sentencepiece model on `texts` in the Gemma tokenizer's style; returns the
    path of the .model file (`model_prefix_or_path`, with '.model' added if it lacks it).

    Gemma's settings (its trainer spec, as quoted by transformers' GemmaConverter): BPE, byte
    fallback (any text encodes, unseen characters as UTF-8 byte pieces), digits split one by
    one, no dummy prefix, whitespace kept as it is, no Unicode normalisation, and the ids
    pad 0, eos 1, bos 2, unk 3. `vocab_size` is an upper bound (a small corpus may support
    fewer merges) and must cover the 256 byte pieces, those 4 and every distinct character of
    `texts`. Takes well under a second for a few thousand short texts.
    """
    prefix = model_prefix_or_path.removesuffix(".model")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        minloglevel=1,
    )
    return prefix + ".model"
