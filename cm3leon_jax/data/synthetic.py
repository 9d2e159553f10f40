"""`synthetic_lm`: a registered SeqIO task of synthetic documents with
learnable structure, shaped like CM3Leon documents (`text <break> image
<eos>`). It is the trainer's smoke-test task: it needs no data on disk and a
working trainer must drive its loss well below ln(vocab).

Each document: a "caption" that is an arithmetic progression of text ids
(random start, stride in {1, 2, 3}, 8-32 tokens), `<break>`, then an "image"
of 16 codes continuing the same progression in the image-code range, `<eos>`.
Only the first two tokens of a document are unpredictable.
"""
from __future__ import annotations

import seqio
import tensorflow as tf

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data.seqio_vocabularies import UnifiedIdsVocabulary

TASK_NAME = "synthetic_lm"
IMAGE_TOKENS = 16


def synthetic_document(index, seed: int, v: vocab_lib.UnifiedVocabulary) -> tf.Tensor:
    """Document number `index` of the stream `seed` (stateless: a pure function)."""
    r = tf.random.stateless_uniform([3], seed=tf.stack([tf.constant(seed, tf.int64), index]),
                                    minval=0, maxval=2 ** 31 - 1, dtype=tf.int64)
    start = r[0] % v.text_vocab_size
    stride = 1 + r[1] % 3
    n_text = 8 + r[2] % 25
    text = (start + stride * tf.range(n_text, dtype=tf.int64)) % v.text_vocab_size + v.text_start
    parts = [text, [v.break_id]]
    if v.image_codebook_size:
        image = (start + stride * tf.range(n_text, n_text + IMAGE_TOKENS, dtype=tf.int64))
        parts.append(image % v.image_codebook_size + v.image_start)
    parts.append([v.eos_id])
    return tf.cast(tf.concat([tf.cast(p, tf.int64) for p in parts], axis=0), tf.int32)


def _dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files
    v = vocab_lib.UnifiedVocabulary()  # sized by the gin bindings in force
    # Distinct, fixed streams per split; the order is a pure function of seed.
    sizes = {"train": 2 ** 62, "validation": 1024}
    if split not in sizes:
        raise ValueError(f"{TASK_NAME}: unknown split {split!r} (train, validation)")
    stream = (0 if seed is None else int(seed)) * 2 + (split == "validation")
    return tf.data.Dataset.range(sizes[split]).map(
        lambda i: {"targets": synthetic_document(i, stream, v)})


def register():
    if TASK_NAME in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.add(
        TASK_NAME,
        source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
        preprocessors=[],
        output_features={"targets": seqio.Feature(UnifiedIdsVocabulary(), add_eos=False, dtype=tf.int32)},
    )


register()
