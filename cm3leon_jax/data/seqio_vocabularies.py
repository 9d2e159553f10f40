"""SeqIO vocabularies of the unified CM3Leon id space: text through the
trained BPE (`CM3TextVocabulary`), VQ image codes (`CM3ImageVocabulary`),
and sequences that already are unified ids (`UnifiedIdsVocabulary`, the
"targets" feature of the CM3 tasks).

    seqio.Feature(CM3TextVocabulary(out_dir), add_eos=False)
    seqio.Feature(CM3ImageVocabulary(), add_eos=False)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.tokenizers import TextTokenizer


def _fold_ragged(flat_values, row_lengths, shape, rank: int):
    """Ragged [*shape, None] from the concatenated rows of a flattened batch."""
    rt = tf.RaggedTensor.from_row_lengths(flat_values, row_lengths)
    for d in reversed(range(1, rank)):
        rt = tf.RaggedTensor.from_uniform_row_length(rt, shape[d])
    return rt


class _UnifiedSpaceVocabulary(seqio.Vocabulary):
    """What the SeqIO vocabularies below share: ids are unified ids (of
    `self.unified`), <eos> is the unified one, no unknown id."""

    @property
    def eos_id(self) -> int:
        return vocab_lib.EOS_ID

    @property
    def unk_id(self) -> Optional[int]:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.unified.size


class CM3TextVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of CM3Leon text: strings <-> unified ids via a trained
    `TextTokenizer`. `vocab_size` is the whole unified vocabulary, so a
    feature of this vocabulary may also hold specials and image codes (a full
    `text <break> image <eos>` document).

    Decoding stops after the first <eos> (SeqIO's rule) and skips special
    ids; image ids are skipped when `skip_non_text` (the default here, so a
    mixed document decodes to its text) and raise otherwise. The TF versions
    run the tokenizer through `tf.numpy_function` (fine in tf.data; such a
    graph cannot be serialised).
    """

    def __init__(self, tokenizer_path: str, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None,
                 skip_non_text: bool = True):
        self.tokenizer = TextTokenizer(tokenizer_path, vocabulary)
        self.unified = self.tokenizer.vocabulary
        self.skip_non_text = skip_non_text
        super().__init__(extra_ids=0)

    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s).tolist()

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(list(ids), np.int64), skip_non_text=self.skip_non_text)

    # numpy bodies of the TF ops
    def _encode_flat_np(self, strings):
        # TF strings are bytes, not necessarily UTF-8: bad bytes become U+FFFD (data/text.py's policy)
        rows = self.tokenizer.encode_batch(
            [text_lib.decode_utf8(s)[0] if isinstance(s, bytes) else str(s) for s in strings.reshape(-1)])
        lengths = np.array([len(r) for r in rows], np.int64)
        flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros([0], np.int32)
        return flat, lengths

    def _decode_rows_np(self, rows):
        return np.array([self.tokenizer.decode(r, skip_non_text=self.skip_non_text).encode("utf-8")
                         for r in rows], dtype=object)

    def _encode_tf(self, s: tf.Tensor):
        """A string tensor -> its ids: [None] int32 for a scalar, a
        RaggedTensor [..., None] for a batch of strings."""
        s = tf.convert_to_tensor(s, tf.string)
        rank = s.shape.rank
        if rank is None:
            raise ValueError("CM3TextVocabulary.encode_tf needs a string tensor of known rank")
        flat, lengths = tf.numpy_function(self._encode_flat_np, [tf.reshape(s, [-1])],
                                          [tf.int32, tf.int64], stateful=False)
        flat.set_shape([None])
        lengths.set_shape([None])
        if rank == 0:
            return flat
        return _fold_ragged(flat, lengths, tf.shape(s, out_type=tf.int64), rank)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Int ids [..., L] -> strings [...]."""
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank is None or ids.shape.rank < 1:
            raise ValueError("CM3TextVocabulary.decode_tf needs ids of rank >= 1")
        shape = tf.shape(ids)
        rows = tf.reshape(ids, tf.stack([-1, shape[-1]]))
        out = tf.numpy_function(self._decode_rows_np, [rows], tf.string, stateful=False)
        out.set_shape([None])
        out = tf.reshape(out, shape[:-1])
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other):
        return (isinstance(other, CM3TextVocabulary) and self.tokenizer.sha256 == other.tokenizer.sha256
                and self.unified == other.unified and self.skip_non_text == other.skip_non_text)

    def __hash__(self):
        return hash((CM3TextVocabulary, self.tokenizer.sha256, self.unified, self.skip_non_text))

    def __repr__(self):
        return f"CM3TextVocabulary({self.tokenizer.path!r}, {self.unified})"


class CM3ImageVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of VQ image codes: codes <-> unified ids.

    `encode` takes codes of any shape (a list, an array, a [h, w] grid) and
    returns the unified ids of the codes in row-major (raster) order; codes
    outside [0, image_codebook_size) raise (ValueError in Python,
    InvalidArgumentError in TF). `decode` returns the codes of the image ids
    up to the first <eos>, other ids (specials, text) dropped.
    """

    def __init__(self, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None):
        self.unified = vocabulary or vocab_lib.UnifiedVocabulary()
        super().__init__(extra_ids=0)

    def _encode(self, codes) -> Sequence[int]:
        if isinstance(codes, (str, bytes)):
            raise TypeError("CM3ImageVocabulary encodes image codes (integers), not strings")
        codes = np.asarray(codes)
        if codes.size == 0:
            return []
        if codes.dtype.kind not in "iu":
            raise TypeError(f"image codes must be integers, got dtype {codes.dtype}")
        return self.unified.image_code_to_id(codes.reshape(-1).astype(np.int64)).astype(np.int32).tolist()

    def _decode(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), np.int64)
        return (ids[self.unified.is_image(ids)] - self.unified.image_start).astype(np.int32)

    def _encode_tf(self, codes: tf.Tensor) -> tf.Tensor:
        codes = tf.reshape(tf.cast(codes, tf.int32), [-1])
        n = self.unified.image_codebook_size
        checks = [
            tf.debugging.assert_non_negative(codes, message="image codes must be >= 0"),
            tf.debugging.assert_less(codes, tf.constant(n, tf.int32),
                                     message=f"image codes must be < image_codebook_size={n}"),
        ]
        with tf.control_dependencies(checks):
            return codes + self.unified.image_start

    def _decode_tf(self, ids: tf.Tensor):
        """Ids [L] -> codes [None]; a batch [..., L] -> a RaggedTensor."""
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int32)
        v = self.unified
        mask = (ids >= v.image_start) & (ids < v.text_start)
        if ids.shape.rank == 1:
            return tf.boolean_mask(ids, mask) - v.image_start
        return tf.ragged.boolean_mask(ids, mask) - v.image_start

    def __eq__(self, other):
        return isinstance(other, CM3ImageVocabulary) and self.unified == other.unified

    def __hash__(self):
        return hash((CM3ImageVocabulary, self.unified))

    def __repr__(self):
        return f"CM3ImageVocabulary({self.unified})"


class UnifiedIdsVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of sequences that are already unified ids (mixed
    text, image codes and specials, as CM3 training sequences are): encode
    and decode pass the ids through unchanged.

    The size is looked up when first asked, from `vocabulary_fn()` (by
    default the gin-bound `UnifiedVocabulary` in force then), so a task
    registered at import time reports the vocabulary of the data or config
    it ends up reading, not the one in force at import."""

    def __init__(self, vocabulary_fn=None):
        self._vocabulary_fn = vocabulary_fn or vocab_lib.UnifiedVocabulary
        super().__init__(extra_ids=0)

    @property
    def unified(self) -> vocab_lib.UnifiedVocabulary:
        return self._vocabulary_fn()

    def _encode(self, s):
        return list(s)

    def _decode(self, ids):
        return list(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        return s

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return ids

    def __eq__(self, other):
        # Equal when the id layouts are (resolving both): the tasks of a mixture
        # over one prepared dataset share a vocabulary.
        if not isinstance(other, UnifiedIdsVocabulary):
            return False
        return self._vocabulary_fn == other._vocabulary_fn or self.unified == other.unified

    def __hash__(self):
        return hash(UnifiedIdsVocabulary)  # consistent with the layout equality

    def __repr__(self):
        return f"UnifiedIdsVocabulary({self._vocabulary_fn!r})"
