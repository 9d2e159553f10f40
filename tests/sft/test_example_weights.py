"""SFT loss weights scaled by target length (sft/example_weights.py), worked
by hand on three packed examples."""
from __future__ import annotations

import numpy as np
import pytest
import seqio
import tensorflow as tf

from cm3leon_jax.sft import tasks
from cm3leon_jax.sft.example_weights import LengthWeightedPrefixLMFeatureConverter

# targets of 4, 2 and 8 tokens (the <eos> 1 included); inputs 8 + targets 8 = rows of 16
EXAMPLES = [{"inputs": [5, 6], "targets": [7, 8, 9, 1]}, {"inputs": [5], "targets": [3, 1]},
            {"inputs": [4, 4, 4], "targets": [2, 2, 2, 2, 2, 2, 2, 1]}]


def _rows(converter):
    ds = tf.data.Dataset.from_generator(lambda: iter(EXAMPLES), output_signature={
        "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
    return list(converter(ds, {"inputs": 8, "targets": 8}).as_numpy_iterator())


def test_each_example_weighs_one_at_power_one_and_its_length_at_zero():
    plain = _rows(seqio.PrefixLMFeatureConverter(pack=True))
    per_example = _rows(LengthWeightedPrefixLMFeatureConverter(1.0, pack=True))
    half = _rows(LengthWeightedPrefixLMFeatureConverter(0.5, pack=True))
    assert [r["decoder_segment_ids"].max() for r in per_example] == [2, 1]  # examples 1+2 packed, then 3
    for p, w, h in zip(plain, per_example, half):
        seg, lw = w["decoder_segment_ids"], w["decoder_loss_weights"]
        assert lw.dtype == np.float32 and np.array_equal(lw > 0, p["decoder_loss_weights"] > 0)
        for s in range(1, seg.max() + 1):
            n = p["decoder_loss_weights"][seg == s].sum()
            np.testing.assert_allclose(lw[seg == s].sum(), 1.0, rtol=1e-6)  # 4 x 1/4, 2 x 1/2, 8 x 1/8
            np.testing.assert_allclose(h["decoder_loss_weights"][seg == s].sum(), n ** 0.5, rtol=1e-6)
    # the other features are SeqIO's own
    for p, w in zip(plain, per_example):
        for k in p:
            if k != "decoder_loss_weights":
                np.testing.assert_array_equal(p[k], w[k])


def test_unpacked_rows_are_one_example_each():
    rows = _rows(LengthWeightedPrefixLMFeatureConverter(1.0, pack=False))
    assert [r["decoder_loss_weights"].sum() for r in rows] == pytest.approx([1.0, 1.0, 1.0])


def test_sft_feature_converter_option():
    assert type(tasks.sft_feature_converter()) is seqio.PrefixLMFeatureConverter
    c = tasks.sft_feature_converter(length_power=1.0)
    assert isinstance(c, LengthWeightedPrefixLMFeatureConverter) and c.length_power == 1.0
    with pytest.raises(ValueError, match="length_power"):
        tasks.sft_feature_converter(length_power=2.0)
