"""The unified CM3Leon vocabulary: special tokens, image codes and text BPE.

One id space (DESIGN.md, "The unified vocabulary"):

    [0, S)          special tokens: <pad>=0, <eos>, <break>, <infill>,
                    <mask:0> ... <mask:M-1>, then reserved ids
    [S, S + C)      image codes (C = 8,192 in the paper's configs)
    [S + C, V)      text BPE ids

The paper's configs: 56,320 text ids (specials included) + 8,192 image codes
= 64,512 ids, a multiple of 128 so the embedding and output matrices shard
evenly over a `model` axis.
"""
from __future__ import annotations

import dataclasses

import gin
import numpy as np

PAD_ID = 0
EOS_ID = 1
BREAK_ID = 2
INFILL_ID = 3
FIRST_MASK_ID = 4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class UnifiedVocabulary:
    """Layout of the unified id space; sizes come from gin.

    Attributes:
      num_special_tokens: S, the size of the special-token block (reserved ids
        after the masks are never produced by a tokenizer).
      num_mask_tokens: M, the number of CM3 sentinels `<mask:i>`.
      image_codebook_size: C, the VQ-GAN codebook size.
      text_vocab_size: number of BPE ids (specials excluded).
    """

    num_special_tokens: int = 64
    num_mask_tokens: int = 32
    image_codebook_size: int = 8192
    text_vocab_size: int = 56320 - 64

    def __post_init__(self):
        if FIRST_MASK_ID + self.num_mask_tokens > self.num_special_tokens:
            raise ValueError(
                f"UnifiedVocabulary: {self.num_mask_tokens} mask tokens do not fit "
                f"in {self.num_special_tokens} special ids (4 are <pad>, <eos>, "
                "<break>, <infill>); raise UnifiedVocabulary.num_special_tokens.")
        for name in ("image_codebook_size", "text_vocab_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"UnifiedVocabulary.{name} must be >= 0")

    # -- sizes ---------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.num_special_tokens + self.image_codebook_size + self.text_vocab_size

    @property
    def image_start(self) -> int:
        return self.num_special_tokens

    @property
    def text_start(self) -> int:
        return self.num_special_tokens + self.image_codebook_size

    # -- special tokens ------------------------------------------------------
    pad_id = PAD_ID
    eos_id = EOS_ID
    break_id = BREAK_ID
    infill_id = INFILL_ID

    def mask_id(self, i: int) -> int:
        if not 0 <= i < self.num_mask_tokens:
            raise ValueError(f"mask index {i} outside [0, {self.num_mask_tokens})")
        return FIRST_MASK_ID + i

    @property
    def mask_ids(self) -> np.ndarray:
        return np.arange(FIRST_MASK_ID, FIRST_MASK_ID + self.num_mask_tokens)

    def is_special(self, ids):
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.num_special_tokens)

    def is_mask(self, ids):
        ids = np.asarray(ids)
        return (ids >= FIRST_MASK_ID) & (ids < FIRST_MASK_ID + self.num_mask_tokens)

    # -- image codes and text: each a contiguous block of the id space ------
    def image_code_to_id(self, codes):
        return _into_block(codes, self.image_start, self.image_codebook_size, "image codes")

    def id_to_image_code(self, ids):
        return _out_of_block(ids, self.image_start, self.image_codebook_size, "image codes")

    def is_image(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.image_start) & (ids < self.text_start)

    def text_token_to_id(self, tokens):
        return _into_block(tokens, self.text_start, self.text_vocab_size, "text BPE ids")

    def id_to_text_token(self, ids):
        return _out_of_block(ids, self.text_start, self.text_vocab_size, "text ids")

    def is_text(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.text_start) & (ids < self.size)

    def token_name(self, i: int) -> str:
        """Human-readable name of one id (for debugging and sample dumps)."""
        i = int(i)
        if not 0 <= i < self.size:
            raise ValueError(f"id {i} outside the vocabulary of size {self.size}")
        names = {PAD_ID: "<pad>", EOS_ID: "<eos>", BREAK_ID: "<break>", INFILL_ID: "<infill>"}
        if i in names:
            return names[i]
        if self.is_mask(i):
            return f"<mask:{i - FIRST_MASK_ID}>"
        if i < self.num_special_tokens:
            return f"<reserved:{i}>"
        if self.is_image(i):
            return f"<img:{i - self.image_start}>"
        if self.is_text(i):
            return f"<txt:{i - self.text_start}>"
        raise ValueError(f"id {i} outside the vocabulary of size {self.size}")


def _into_block(values, start: int, count: int, what: str):
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= count):
        raise ValueError(f"{what} must lie in [0, {count}); got [{values.min()}, {values.max()}]")
    return values + start


def _out_of_block(ids, start: int, count: int, what: str):
    ids = np.asarray(ids)
    if ids.size and ((ids < start) | (ids >= start + count)).any():
        raise ValueError(f"some ids are not {what} (expected ids in [{start}, {start + count}))")
    return ids - start


@gin.configurable
def vocab_size(vocabulary: UnifiedVocabulary | None = None) -> int:
    """Gin helper: `DecoderConfig.vocab_size = @vocab_size()` sizes the model
    from the `UnifiedVocabulary` bindings."""
    return (vocabulary or UnifiedVocabulary()).size


@gin.configurable
def image_id_range(vocabulary: UnifiedVocabulary | None = None) -> tuple:
    """Gin helper: `DecoderConfig.image_id_range = @image_id_range()` gives the
    decoder the [start, end) ids of the image codes (2-D image positions)."""
    v = vocabulary or UnifiedVocabulary()
    return (v.image_start, v.text_start)
