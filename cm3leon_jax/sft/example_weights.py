"""Loss weights that do not let long targets drown short ones.

SeqIO's prefix-LM converter gives every target token weight 1, and the
trainer divides the weighted loss by the batch's total weight (train/step.py):
a mean over target tokens. In an SFT mixture an example's share of the
gradient is then its target length: a VQA answer (~3 tokens) weighs 1/20 of
an edited image (65). `length_power` p scales each example's target tokens
by n^-p, n its number of target tokens (after packing, per segment):

    p = 0   a mean over target tokens (SeqIO's weights, the default)
    p = 1   a mean over examples of each example's mean token loss (T5X's
            "average per sequence" normalisation): every example counts alike
    0 < p < 1   in between

The weights become float32; the trainer's loss already takes float weights.
An example's weights sum to n^(1-p) >= 1, so the trainer's guard on the
batch's total weight (max(total, 1), train/step.py) never changes the loss,
and its `num_loss_tokens` metric (that total) then counts weighted
examples, not tokens.
"""
from __future__ import annotations

import seqio
import tensorflow as tf


def scale_by_length(features: dict, length_power: float) -> dict:
    """`features` with decoder_loss_weights scaled by n^-length_power per
    example (its segment when packed, else the whole row)."""
    w = tf.cast(features["decoder_loss_weights"], tf.float32)
    seg = features.get("decoder_segment_ids")
    if seg is None:
        n = tf.fill(tf.shape(w), tf.reduce_sum(w))
    else:
        n = tf.gather(tf.math.unsorted_segment_sum(w, seg, num_segments=tf.reduce_max(seg) + 1), seg)
    out = dict(features)
    out["decoder_loss_weights"] = tf.where(w > 0, w * tf.pow(tf.maximum(n, 1.0), -float(length_power)), 0.0)
    return out


class LengthWeightedPrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
    """SeqIO's prefix-LM converter with float loss weights scaled by
    `scale_by_length` (module docstring)."""

    MODEL_FEATURES = dict(seqio.PrefixLMFeatureConverter.MODEL_FEATURES,
                          decoder_loss_weights=seqio.FeatureConverter.FeatureSpec(dtype=tf.float32))

    def __init__(self, length_power: float, **kwargs):
        if not 0.0 <= float(length_power) <= 1.0:
            raise ValueError(f"length_power must lie in [0, 1] (0: a mean over target tokens, 1: over "
                             f"examples), got {length_power}")
        self.length_power = float(length_power)
        super().__init__(**kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        ds = super()._convert_features(ds, task_feature_lengths)
        return ds.map(lambda f: scale_by_length(f, self.length_power), num_parallel_calls=tf.data.AUTOTUNE)
