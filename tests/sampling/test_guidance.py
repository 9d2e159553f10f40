"""Logit processors (sampling/guidance.py) on examples worked by hand."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.sampling import guidance as g


def _kept(x):
    return np.flatnonzero(np.isfinite(np.asarray(x))).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (.5), 3 (.3), 0 (.15), 2 (.05)
    logits = jnp.log(jnp.asarray(probs))
    assert _kept(g.top_p(logits, 0.5)) == [1]          # .5 alone reaches .5
    assert _kept(g.top_p(logits, 0.6)) == [1, 3]       # .5 < .6 <= .8
    assert _kept(g.top_p(logits, 0.85)) == [0, 1, 3]   # .8 < .85 <= .95
    assert _kept(g.top_p(logits, 0.99)) == [0, 1, 2, 3]
    assert _kept(g.top_p(logits, 0.01)) == [1]         # at least the most likely token
    kept = np.asarray(g.top_p(logits, 0.6))
    np.testing.assert_allclose(kept[[1, 3]], np.log(probs[[1, 3]]), rtol=1e-6)  # kept logits unchanged
    batch = g.top_p(jnp.stack([logits, logits[::-1]]), 0.6)  # per row
    assert _kept(batch[0]) == [1, 3] and _kept(batch[1]) == [0, 2]
    with pytest.raises(ValueError):
        g.top_p(logits, 0.0)


def test_top_k_and_temperature():
    logits = jnp.asarray([1.0, 4.0, 2.0, 3.0])
    assert _kept(g.top_k(logits, 2)) == [1, 3]
    np.testing.assert_allclose(np.asarray(g.temperature(logits, 2.0)), [0.5, 2.0, 1.0, 1.5])
    with pytest.raises(ValueError):
        g.temperature(logits, 0.0)


def test_classifier_free_guidance_endpoints_and_a_scale():
    cond, uncond = jnp.asarray([1.0, 3.0, -2.0]), jnp.asarray([2.0, 0.0, 1.0])
    np.testing.assert_allclose(np.asarray(g.classifier_free_guidance(cond, uncond, 1.0)), cond)
    np.testing.assert_allclose(np.asarray(g.classifier_free_guidance(cond, uncond, 0.0)), uncond)
    # alpha 3: uncond + 3 (cond - uncond) = (2 - 3, 0 + 9, 1 - 9)
    np.testing.assert_allclose(np.asarray(g.classifier_free_guidance(cond, uncond, 3.0)), [-1.0, 9.0, -8.0])


def test_two_scale_guidance_by_hand():
    full, image, none = jnp.asarray([4.0, 0.0]), jnp.asarray([2.0, 1.0]), jnp.asarray([1.0, 1.0])
    # none + 1.5 (image - none) + 7.5 (full - image) = (1 + 1.5 + 15, 1 + 0 - 7.5)
    np.testing.assert_allclose(np.asarray(g.two_scale_guidance(full, image, none, 1.5, 7.5)), [17.5, -6.5])


# 6 tokens. Expert: token 0 is its argmax; amateur: token 0 is its favourite too.
P_EXP = np.array([0.40, 0.30, 0.15, 0.10, 0.04, 0.01])
P_AMA = np.array([0.60, 0.10, 0.20, 0.05, 0.0499, 0.0001])


def test_cd_k_picks_what_the_formula_picks():
    e, a = jnp.log(jnp.asarray(P_EXP)), jnp.log(jnp.asarray(P_AMA))
    # k = 3: kmax(p_EXP) = 0.15; alpha 0.5 -> allowed p >= 0.075: tokens 0-3.
    # log(p_EXP / p_AMA): 0: log(2/3), 1: log 3, 2: log .75, 3: log 2 -> token 1
    # (the expert's argmax, 0, is not chosen; token 5's ratio 100 is not allowed).
    s = np.asarray(g.contrastive_scores(e, a, alpha=0.5, k=3))
    assert _kept(s) == [0, 1, 2, 3]
    np.testing.assert_allclose(s[:4], np.log(P_EXP[:4] / P_AMA[:4]), rtol=1e-5)
    assert int(np.argmax(s)) == 1
    # alpha 1, k 1: only tokens as likely as the expert's best -> token 0
    s = np.asarray(g.contrastive_scores(e, a, alpha=1.0, k=1))
    assert _kept(s) == [0] and int(np.argmax(s)) == 0
    # alpha 1, k 4: threshold 0.10 -> tokens 0-3 again -> token 1
    assert int(np.argmax(np.asarray(g.contrastive_scores(e, a, alpha=1.0, k=4)))) == 1
    # alpha 0: everything allowed -> token 5 (ratio 100)
    assert int(np.argmax(np.asarray(g.contrastive_scores(e, a, alpha=0.0, k=1)))) == 5


def test_restrict_and_allowed_ids():
    m = g.allowed_ids_mask(8, 2, 5, extra=(7,))
    assert np.flatnonzero(np.asarray(m)).tolist() == [2, 3, 4, 7]
    assert _kept(g.restrict(jnp.zeros(8), m)) == [2, 3, 4, 7]


def test_cd_k_defaults_keep_a_sure_expert_s_choice():
    # Blank background: the expert is 99% sure of token 0 and the amateur
    # (no caption) even surer. Any k > 1 admits the k likeliest tokens however
    # peaked the expert is, and the ratio then prefers one the expert gives
    # 0.2%: the noise CD-K painted over the demo's images with k = 5.
    from cm3leon_jax.sampling.sampler import SamplingSettings

    p_exp = np.array([0.990, 0.004, 0.002, 0.002, 0.001, 0.001])
    p_ama = np.array([0.999, 0.0006, 0.0001, 0.0001, 0.0001, 0.0001])
    e, a = jnp.log(jnp.asarray(p_exp)), jnp.log(jnp.asarray(p_ama))
    assert int(np.argmax(np.asarray(g.contrastive_scores(e, a, alpha=0.1, k=5)))) != 0
    s = SamplingSettings("cd_k")
    assert int(np.argmax(np.asarray(g.contrastive_scores(e, a, s.cd_alpha, s.cd_k)))) == 0
