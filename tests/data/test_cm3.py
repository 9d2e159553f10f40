"""Tests of the CM3 causal-masked objective (cm3leon_jax/data/cm3.py)."""
from __future__ import annotations

import collections
import itertools
import math
import subprocess
import sys

import gin
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.data import cm3
from cm3leon_jax.vocab import BREAK_ID, EOS_ID, INFILL_ID, PAD_ID, UnifiedVocabulary

V = UnifiedVocabulary()
BR, INF = BREAK_ID, INFILL_ID
M = [V.mask_id(i) for i in range(V.num_mask_tokens)]  # M[k] = <mask:k> = 4 + k
T = V.text_start    # T + i: text token i
I = V.image_start   # I + i: image code i
PROPS = settings(max_examples=200, deadline=None)


def doc(*ids) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


# -- reference helpers written independently of the module ----------------------
def recover_spans(out: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) spans (in original positions) encoded in an output."""
    out = list(out)
    if INF not in out:
        return []
    sep = out.index(INF)
    head, tail = out[:sep], out[sep + 1:]
    lengths, k = {}, None
    for t in tail:
        if 4 <= t < 4 + V.num_mask_tokens:
            k = t - 4
            lengths[k] = 0
        else:
            lengths[k] += 1
    spans, pos = [], 0
    for t in head:
        if 4 <= t < 4 + V.num_mask_tokens:
            spans.append((pos, pos + lengths[t - 4]))
            pos += lengths[t - 4]
        else:
            pos += 1
    return spans


def brute_force_placements(tokens, n):
    """Every valid placement of n spans: non-empty, sorted, non-adjacent, no <break>."""
    tokens, L, out = list(tokens), len(tokens), []

    def extend(placed, pos):
        if len(placed) == n:
            out.append(tuple(placed))
            return
        for s in range(pos, L):
            for e in range(s + 1, L + 1):
                if tokens[e - 1] == BR:
                    break
                extend(placed + [(s, e)], e + 1)

    extend([], 0)
    return out


def n_spans(out) -> int:
    return int(V.is_mask(out).sum()) // 2


documents = st.lists(
    st.one_of(st.just(BR), st.integers(T, T + 300), st.integers(I, I + 300)),
    min_size=0, max_size=60).map(lambda xs: np.array(xs, dtype=np.int64))


# -- apply_spans against hand-written layouts ------------------------------------
def test_apply_spans_example_from_spec():
    a, b, c, d, e, f = (T + i for i in range(6))
    got = cm3.apply_spans(doc(a, b, c, d, e, f), [(1, 3), (4, 5)])
    np.testing.assert_array_equal(got, [a, M[0], d, M[1], f, INF, M[0], b, c, M[1], e])


def test_apply_spans_text_break_image_ten_tokens():
    # t0..t4 <break> i0..i3: mask text t1 t2 and the whole image.
    x = doc(T, T + 1, T + 2, T + 3, T + 4, BR, I, I + 1, I + 2, I + 3)
    got = cm3.apply_spans(x, [(1, 3), (6, 10)])
    want = [T, M[0], T + 3, T + 4, BR, M[1],
            INF, M[0], T + 1, T + 2, M[1], I, I + 1, I + 2, I + 3]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(cm3.cm3_inverse(got), x)


def test_apply_spans_three_spans_at_edges():
    x = doc(*(I + i for i in range(4)), BR, *(T + i for i in range(5)))  # 10 tokens
    got = cm3.apply_spans(x, [(0, 1), (3, 4), (5, 10)])
    want = [M[0], I + 1, I + 2, M[1], BR, M[2],
            INF, M[0], I, M[1], I + 3, M[2], T, T + 1, T + 2, T + 3, T + 4]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cm3.cm3_inverse(got), x)


def test_apply_spans_no_spans_is_a_copy():
    x = doc(T, BR, I)
    got = cm3.apply_spans(x, [])
    np.testing.assert_array_equal(got, x)
    got[0] = 99
    assert x[0] == T


@pytest.mark.parametrize("spans, match", [
    ([(2, 2)], "empty or outside"),
    ([(3, 1)], "empty or outside"),
    ([(0, 11)], "empty or outside"),
    ([(-1, 2)], "empty or outside"),
    ([(1, 4), (3, 5)], "overlaps"),
    ([(6, 8), (1, 2)], "overlaps or precedes"),
    ([(4, 6)], "contains a <break>"),
    ([(5, 6)], "contains a <break>"),
])
def test_apply_spans_rejects_bad_spans(spans, match):
    x = doc(T, T + 1, T + 2, T + 3, T + 4, BR, I, I + 1, I + 2, I + 3)
    with pytest.raises(ValueError, match=match):
        cm3.apply_spans(x, spans)


def test_apply_spans_rejects_more_spans_than_sentinels():
    x = np.arange(T, T + 200)
    with pytest.raises(ValueError, match="sentinels"):
        cm3.apply_spans(x, [(2 * i, 2 * i + 1) for i in range(33)])


# -- cm3_transform: draws, determinism ------------------------------------------
def test_transform_follows_documented_draw_order():
    x = doc(T, T + 1, T + 2, T + 3, T + 4, BR, I, I + 1, I + 2, I + 3)
    seen_masked = 0
    for seed in range(50):
        out = cm3.cm3_transform(x, np.random.default_rng(seed), poisson_lambda=2.0)
        r = np.random.default_rng(seed)
        r.random()
        n = min(int(r.poisson(2.0)), cm3.span_capacity(x))
        spans = cm3.sample_spans(x, n, r)
        np.testing.assert_array_equal(out, cm3.apply_spans(x, spans))
        assert recover_spans(out) == spans
        seen_masked += n > 0
    assert seen_masked > 30


def test_transform_is_pure_and_does_not_mutate():
    x = np.arange(T, T + 40)
    x[13] = BR
    before = x.copy()
    a = cm3.cm3_transform(x, np.random.default_rng(7), poisson_lambda=3.0)
    b = cm3.cm3_transform(x, np.random.default_rng(7), poisson_lambda=3.0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)
    outs = {tuple(cm3.cm3_transform(x, np.random.default_rng(s), poisson_lambda=3.0))
            for s in range(20)}
    assert len(outs) > 15


def test_seeded_spans_are_valid_and_layout_matches():
    x = doc(T, T + 1, T + 2, T + 3, T + 4, BR, I, I + 1, I + 2, I + 3)
    rng = np.random.default_rng(1234)
    for _ in range(200):
        out = cm3.cm3_transform(x, rng, poisson_lambda=1.5)
        spans = recover_spans(out)
        for (s, e), nxt in itertools.zip_longest(spans, spans[1:]):
            assert 0 <= s < e <= len(x)
            assert BR not in list(x[s:e])
            if nxt is not None:
                assert e < nxt[0]  # non-overlapping and non-adjacent
        np.testing.assert_array_equal(out, cm3.apply_spans(x, spans))
        assert len(out) == len(x) + (2 * len(spans) + 1 if spans else 0)


# -- sampling is uniform over valid placements ----------------------------------
@pytest.mark.parametrize("n, n_placements", [(1, 9), (2, 19)])
def test_sample_spans_uniform_over_placements(n, n_placements):
    # segments of 3 and 2 tokens: 1 span: C(4,2) + C(3,2) = 9 placements;
    # 2 spans: C(4,4) + C(4,2) * C(3,2) = 19.
    x = doc(T, T + 1, T + 2, BR, I, I + 1)
    placements = brute_force_placements(x, n)
    assert len(placements) == n_placements
    per = 300
    rng = np.random.default_rng(0)
    counts = collections.Counter(tuple(cm3.sample_spans(x, n, rng))
                                 for _ in range(per * n_placements))
    assert set(counts) == set(placements)
    chi2 = sum((counts[p] - per) ** 2 / per for p in placements)
    assert chi2 < {9: 26.1, 19: 42.3}[n_placements]  # p = 0.001 for 8 / 18 dof


@given(documents)
@PROPS
def test_span_capacity_matches_brute_force(x):
    x = x[:10]
    cap = cm3.span_capacity(x)
    assert brute_force_placements(x, cap) or cap == 0
    assert not brute_force_placements(x, cap + 1)


# -- properties: breaks, token multiset, inverse ---------------------------------
@given(documents, st.integers(0, 2 ** 32 - 1), st.sampled_from([1.0, 3.0, 10.0]))
@PROPS
def test_no_span_contains_or_crosses_break(x, seed, lam):
    out = cm3.cm3_transform(x, np.random.default_rng(seed), poisson_lambda=lam)
    if cm3.is_masked(out):
        sep = list(out).index(INF)
        assert BR not in list(out[sep + 1:])
        assert list(out[:sep]).count(BR) == list(x).count(BR)
    for s, e in recover_spans(out):
        assert BR not in list(x[s:e])
    # the break positions relative to the other original tokens are unchanged
    np.testing.assert_array_equal(np.flatnonzero(cm3.cm3_inverse(out) == BR),
                                  np.flatnonzero(x == BR))


@given(documents, st.integers(0, 2 ** 32 - 1), st.sampled_from([1.0, 4.0, 30.0]),
       st.sampled_from([0.0, 0.5]))
@PROPS
def test_tokens_preserved_exactly_and_inverse(x, seed, lam, rate):
    out = cm3.cm3_transform(x, np.random.default_rng(seed), poisson_lambda=lam,
                            unmasked_rate=rate)
    kept = out[~V.is_mask(out) & (out != INF)]
    assert collections.Counter(kept.tolist()) == collections.Counter(x.tolist())
    np.testing.assert_array_equal(cm3.cm3_inverse(out), x)
    assert cm3.is_masked(out) == (n_spans(out) > 0)
    if cm3.is_masked(out):
        k = n_spans(out)
        assert len(out) == len(x) + 2 * k + 1
        assert 1 <= k <= min(V.num_mask_tokens, cm3.span_capacity(x))
        np.testing.assert_array_equal(out[V.is_mask(out)], list(range(4, 4 + k)) * 2)
    else:
        np.testing.assert_array_equal(out, x)


def test_inverse_keeps_trailing_eos():
    x = doc(T, T + 1, T + 2, BR, I, I + 1)
    out = cm3.apply_spans(x, [(1, 2), (4, 6)])
    np.testing.assert_array_equal(cm3.cm3_inverse(np.append(out, EOS_ID)),
                                  np.append(x, EOS_ID))


@pytest.mark.parametrize("bad, match", [
    ([T, M[0], T, INF, M[1], T], "in order"),
    ([T, M[0], T, INF, T, M[0], T], "must start with <mask:0>"),
    ([T, M[0], INF, M[0], T, INF], "more than one <infill>"),
    ([T, M[1], INF, M[0], T], "in order"),
])
def test_inverse_rejects_malformed(bad, match):
    with pytest.raises(ValueError, match=match):
        cm3.cm3_inverse(np.array(bad))


# -- span count distribution and unmasked rate ----------------------------------
LONG = np.concatenate([np.arange(T, T + 150), [BR], np.arange(I, I + 250)])


def test_span_count_is_poisson_one():
    rng = np.random.default_rng(0)
    k = np.array([n_spans(cm3.cm3_transform(LONG, rng)) for _ in range(4000)])
    assert abs(k.mean() - 1.0) < 0.06          # sd of the mean ~0.016
    assert abs((k == 0).mean() - math.exp(-1)) < 0.03  # sd ~0.008
    assert abs(k.var() - 1.0) < 0.15
    assert abs((k == 1).mean() - math.exp(-1)) < 0.03


def test_span_count_other_lambda_and_cap():
    rng = np.random.default_rng(1)
    k = np.array([n_spans(cm3.cm3_transform(LONG, rng, poisson_lambda=3.0))
                  for _ in range(2000)])
    assert abs(k.mean() - 3.0) < 0.15
    k = np.array([n_spans(cm3.cm3_transform(LONG, rng, poisson_lambda=3.0, max_spans=2))
                  for _ in range(2000)])
    assert k.max() == 2
    assert abs((k == 2).mean() - (1 - 4 * math.exp(-3))) < 0.04


def test_unmasked_rate_fraction():
    rng = np.random.default_rng(2)
    # lambda = 20: a Poisson zero is negligible, so unchanged <=> left unmasked
    unchanged = [not cm3.is_masked(cm3.cm3_transform(LONG, rng, poisson_lambda=20.0,
                                                     unmasked_rate=0.3))
                 for _ in range(4000)]
    assert abs(np.mean(unchanged) - 0.3) < 0.03
    # with lambda = 1 the Poisson zeros add up: 0.3 + 0.7 exp(-1)
    unchanged = [not cm3.is_masked(cm3.cm3_transform(LONG, rng, unmasked_rate=0.3))
                 for _ in range(4000)]
    assert abs(np.mean(unchanged) - (0.3 + 0.7 * math.exp(-1))) < 0.03


def test_mask_prompt_masks_the_whole_first_segment_by_hand():
    d = doc(T + 1, T + 2, BR, I + 5, I + 6, I + 7)
    rng = np.random.default_rng(0)
    out = cm3.cm3_transform(d, rng, poisson_lambda=0.0, mask_prompt_rate=1.0)
    # CFG's unconditional layout, the caption moved behind <infill>
    assert out.tolist() == [M[0], BR, I + 5, I + 6, I + 7, INF, M[0], T + 1, T + 2]
    assert cm3.cm3_inverse(out).tolist() == d.tolist()
    # a one-segment document has no prompt to mask: the Poisson draw decides (lambda 0: unchanged)
    assert cm3.cm3_transform(doc(T + 1, T + 2), rng, poisson_lambda=0.0, mask_prompt_rate=1.0).tolist() == [
        T + 1, T + 2]


def test_mask_prompt_rate_fraction_and_zero_keeps_the_draws():
    d = doc(T + 1, T + 2, T + 3, BR, *[I + i for i in range(10)])
    rng = np.random.default_rng(3)
    outs = [cm3.cm3_transform(d, rng, poisson_lambda=0.0, mask_prompt_rate=0.25) for _ in range(4000)]
    assert abs(np.mean([o[0] == M[0] and o[1] == BR for o in outs]) - 0.25) < 0.03
    # rate 0 draws nothing more: the same stream as before the option existed
    a = [cm3.cm3_transform(d, np.random.default_rng(s)).tolist() for s in range(20)]
    b = [cm3.cm3_transform(d, np.random.default_rng(s), mask_prompt_rate=0.0).tolist() for s in range(20)]
    assert a == b


def test_unmasked_rate_one_never_masks():
    rng = np.random.default_rng(3)
    for _ in range(300):
        out = cm3.cm3_transform(LONG, rng, poisson_lambda=20.0, unmasked_rate=1.0)
        np.testing.assert_array_equal(out, LONG)
        assert out is not LONG


# -- edge cases -------------------------------------------------------------------
def test_empty_document():
    x = np.array([], dtype=np.int32)
    for seed in range(20):
        out = cm3.cm3_transform(x, np.random.default_rng(seed), poisson_lambda=50.0)
        assert out.shape == (0,) and out.dtype == np.int32
    assert cm3.span_capacity(x) == 0
    np.testing.assert_array_equal(cm3.cm3_inverse(x), x)


def test_one_token_document():
    x = doc(T + 5)
    out = cm3.cm3_transform(x, np.random.default_rng(0), poisson_lambda=50.0)
    np.testing.assert_array_equal(out, [M[0], INF, M[0], T + 5])
    np.testing.assert_array_equal(cm3.cm3_inverse(out), x)


def test_all_break_document():
    x = doc(BR, BR, BR)
    assert cm3.span_capacity(x) == 0
    for seed in range(20):
        out = cm3.cm3_transform(x, np.random.default_rng(seed), poisson_lambda=50.0)
        np.testing.assert_array_equal(out, x)


def test_more_spans_than_fit():
    x = doc(T, T + 1, T + 2, BR, I, I + 1, I + 2)  # capacity 2 + 2 = 4, one placement
    assert cm3.span_capacity(x) == 4
    rng = np.random.default_rng(4)
    for _ in range(50):
        out = cm3.cm3_transform(x, rng, poisson_lambda=100.0)
        assert recover_spans(out) == [(0, 1), (2, 3), (4, 5), (6, 7)]  # the only way
    with pytest.raises(ValueError, match="do not fit"):
        cm3.sample_spans(x, 5, rng)


def test_max_spans_zero_never_masks():
    rng = np.random.default_rng(5)
    for _ in range(50):
        np.testing.assert_array_equal(
            cm3.cm3_transform(LONG, rng, poisson_lambda=20.0, max_spans=0), LONG)


def test_max_spans_default_is_the_number_of_sentinels():
    small = UnifiedVocabulary(num_mask_tokens=3)
    out = cm3.cm3_transform(LONG, np.random.default_rng(6), vocab=small, poisson_lambda=100.0)
    assert n_spans(out) == 3
    np.testing.assert_array_equal(cm3.cm3_inverse(out, small), LONG)


# -- bad inputs ----------------------------------------------------------------
@pytest.mark.parametrize("tokens, match", [
    (np.array([[T, T + 1]]), "1-D"),
    (np.array([1.0, 2.0]), "integer"),
    (np.array([], dtype=np.float32), "integer"),
    (doc(T, PAD_ID), "<pad>"),
    (doc(T, EOS_ID), "<eos>"),
    (doc(INF, T), "<infill>"),
    (doc(T, M[0]), "<mask:i>"),
    (doc(T, M[31]), "<mask:i>"),
    (doc(T, -1), r"\[0, "),
    (doc(T, V.size), r"\[0, "),
])
def test_bad_documents_raise(tokens, match):
    with pytest.raises(ValueError, match=match):
        cm3.cm3_transform(tokens, np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        cm3.apply_spans(tokens, [])


@pytest.mark.parametrize("kwargs, match", [
    (dict(poisson_lambda=-1.0), "poisson_lambda"),
    (dict(poisson_lambda=float("nan")), "poisson_lambda"),
    (dict(unmasked_rate=1.5), "unmasked_rate"),
    (dict(unmasked_rate=-0.1), "unmasked_rate"),
    (dict(max_spans=33), "max_spans"),
    (dict(max_spans=-1), "max_spans"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cm3.cm3_transform(doc(T), np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match=match):
        cm3.CM3Objective(**kwargs)


# -- gin and imports ---------------------------------------------------------------
def test_objective_is_gin_configurable():
    gin.clear_config()
    try:
        gin.parse_config("""
            CM3Objective.unmasked_rate = 0.25
            CM3Objective.poisson_lambda = 2.0
            CM3Objective.max_spans = 4
            CM3Objective.vocab = @UnifiedVocabulary()
            UnifiedVocabulary.num_mask_tokens = 8
        """)
        obj = cm3.CM3Objective()
    finally:
        gin.clear_config()
    assert (obj.unmasked_rate, obj.poisson_lambda, obj.max_spans) == (0.25, 2.0, 4)
    assert obj.vocab.num_mask_tokens == 8
    a = obj(LONG, np.random.default_rng(9))
    b = cm3.cm3_transform(LONG, np.random.default_rng(9), vocab=obj.vocab, poisson_lambda=2.0,
                          unmasked_rate=0.25, max_spans=4)
    np.testing.assert_array_equal(a, b)
    assert cm3.CM3Objective().unmasked_rate == 0.0


def test_module_does_not_import_jax():
    code = "import sys, cm3leon_jax.data.cm3; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_per_document_by_hand():
    # two documents and a truncated tail; the objective tags each one it sees
    seen = []

    def tag(doc, rng):
        seen.append(doc.tolist())
        return np.concatenate([[99], doc])

    seq = np.array([10, 11, EOS_ID, 12, EOS_ID, EOS_ID, 13, 14], np.int32)
    out = cm3.apply_per_document(seq, tag, np.random.default_rng(0))
    assert out.tolist() == [99, 10, 11, EOS_ID, 99, 12, EOS_ID, EOS_ID, 99, 13, 14]
    assert seen == [[10, 11], [12], [13, 14]]  # the empty document is kept, not transformed
    assert out.dtype == np.int32


def test_apply_per_document_matches_per_document_draws():
    # the same rng stream, document by document, gives the same sequence
    rng_docs = np.random.default_rng(5)
    docs = [rng_docs.integers(V.text_start, V.size, size=n).astype(np.int32) for n in (7, 1, 12)]
    seq = np.concatenate([np.concatenate([d, [EOS_ID]]) for d in docs]).astype(np.int32)
    obj = cm3.CM3Objective(vocab=V)
    got = cm3.apply_per_document(seq, obj, np.random.default_rng(1))
    r = np.random.default_rng(1)
    want = np.concatenate([np.concatenate([obj(d, r), [EOS_ID]]) for d in docs])
    assert got.tolist() == want.tolist()
    pieces = np.split(got, np.flatnonzero(got == EOS_ID) + 1)[:-1]
    assert [cm3.cm3_inverse(p).tolist() for p in pieces] == [d.tolist() + [EOS_ID] for d in docs]
