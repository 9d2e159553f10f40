"""The project's text tokenizer: a trained byte-level BPE speaking ids of the
unified CM3Leon id space (`TextTokenizer`).

Text is a byte-level BPE trained with the Hugging Face `tokenizers` library
(data/bpe_training.py): the ByteLevel pre-tokenizer maps every UTF-8 byte to
one of 256 printable characters and the trainer starts from all 256 of them,
so any Unicode string encodes without an unknown token and decodes back
exactly. The BPE has no special tokens of its own: CM3Leon's specials
(<pad>, <eos>, <break>, <infill>, <mask:i>) live in the unified block
[0, S), so BPE id `b` is the unified id `b + UnifiedVocabulary.text_start`
and no text ever maps to a special or an image id.

A BPE whose corpus supported fewer merges than its size holds unreachable
`⟨unused:i⟩` padding entries up to `UnifiedVocabulary.text_vocab_size`
(data/bpe_training.py's size control); `decode` drops them.

    TextTokenizer(out_dir).encode("a caption") -> unified ids

Its SeqIO vocabularies: data/seqio_vocabularies.py.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

import numpy as np

from cm3leon_jax import vocab as vocab_lib

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN_PREFIX = "\u27e8unused:"  # "⟨unused:i⟩": outside the byte alphabet, so unreachable


def _check_encodable(text: str, what: str) -> None:
    """The BPE (Rust) takes only valid Unicode; say which text is not,
    instead of its `TypeError: TextInputSequence must be str`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate {text[e.start]!r} at character {e.start} "
                         f"({text[max(0, e.start - 20):e.start]!r}...): not Unicode text; clean it with "
                         "cm3leon_jax.data.text.clean_text") from None


def _tokenizer_file(path: str) -> str:
    path = os.fspath(path)
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


class TextTokenizer:
    """A trained byte-level BPE, speaking unified ids.

    Args:
      path: a directory holding `tokenizer.json` (what `train_text_tokenizer`
        wrote), or the file itself.
      vocabulary: the unified layout; default `UnifiedVocabulary()` (gin).

    Raises ValueError when the BPE was trained for another size than
    `vocabulary.text_vocab_size`, has tokens of its own (added/special), or
    does not cover all 256 bytes (so some text would not round-trip).
    """

    def __init__(self, path: str, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None):
        from tokenizers import Tokenizer, pre_tokenizers

        self.path = _tokenizer_file(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"no tokenizer at {path!r} (expected {TOKENIZER_FILE}; train one with "
                             "`cm3leon tokenizer train-text`)")
        self.vocabulary = vocabulary or vocab_lib.UnifiedVocabulary()
        with open(self.path, "rb") as f:
            raw = f.read()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        size = self._tok.get_vocab_size(with_added_tokens=True)
        want = self.vocabulary.text_vocab_size
        if size != want:
            raise ValueError(
                f"tokenizer {self.path} was trained for {size} BPE ids but the unified vocabulary has "
                f"text_vocab_size={want}: bind `UnifiedVocabulary.text_vocab_size = {size}` or retrain "
                f"with --vocab_size {want}")
        added = self._tok.get_vocab_size(with_added_tokens=True) - self._tok.get_vocab_size(False)
        if added:
            raise ValueError(f"tokenizer {self.path} has {added} added/special tokens; CM3Leon's specials "
                             "live in the unified block, the BPE must have none")
        token_to_id = self._tok.get_vocab(with_added_tokens=False)
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in token_to_id]
        if missing:
            raise ValueError(f"tokenizer {self.path} lacks {len(missing)} of the 256 byte tokens: not a "
                             "byte-level BPE, some text would not round-trip")
        pads = [i for t, i in token_to_id.items() if t.startswith(PAD_TOKEN_PREFIX)]
        self.learned_vocab_size = min(pads) if pads else size
        self._decode_table = None

    @property
    def vocab_size(self) -> int:
        """Number of BPE ids (= vocabulary.text_vocab_size)."""
        return self.vocabulary.text_vocab_size

    def _to_unified(self, bpe_ids) -> np.ndarray:
        ids = np.asarray(bpe_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.learned_vocab_size):  # cannot happen
            raise AssertionError("BPE produced an id outside its learned vocabulary")
        return (ids + self.vocabulary.text_start).astype(np.int32)

    def encode(self, text: str) -> np.ndarray:
        """Unified ids (int32) of `text`; all of them text ids. "" -> [].

        Raises TypeError for a non-str and ValueError for a str that is not
        Unicode text (a lone surrogate: clean it first with
        `data.text.clean_text`, as every source does at ingestion)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if not text:
            return np.zeros([0], np.int32)
        _check_encodable(text, "encode's text")
        return self._to_unified(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch takes strs, got {type(t).__name__} at position {i}")
            _check_encodable(t, f"encode_batch's text {i}")
        encs = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        return [self._to_unified(e.ids) for e in encs]

    def decode(self, ids, skip_non_text: bool = False) -> str:
        """The text of unified `ids` (a 1-D sequence).

        Special ids (<pad>, <eos>, <break>, masks, ...) are skipped, as are the
        unused padding ids of a BPE that learned fewer tokens than its size.
        Image ids raise ValueError unless `skip_non_text=True` (then they are
        skipped too: the text of a mixed document). Ids outside the unified
        vocabulary always raise ValueError.
        """
        v = self.vocabulary
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D id sequence, got shape {ids.shape}")
        if ids.size == 0:
            return ""
        if ids.dtype.kind not in "iu":
            raise TypeError(f"decode takes integer ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = (ids < 0) | (ids >= v.size)
        if bad.any():
            raise ValueError(f"ids {ids[bad][:5].tolist()} are outside the unified vocabulary [0, {v.size})")
        image = v.is_image(ids)
        if image.any() and not skip_non_text:
            raise ValueError(f"decode got {int(image.sum())} image ids among text ids (first at position "
                             f"{int(np.argmax(image))}); pass skip_non_text=True to drop them")
        bpe = ids[v.is_text(ids)] - v.text_start
        bpe = bpe[bpe < self.learned_vocab_size]
        return self._tok.decode(bpe.tolist(), skip_special_tokens=False) if bpe.size else ""

    def decode_batch(self, batch, skip_non_text: bool = False) -> list[str]:
        return [self.decode(ids, skip_non_text=skip_non_text) for ids in batch]
