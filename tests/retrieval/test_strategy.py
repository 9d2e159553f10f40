"""The retrieval strategy's rules, each on a small example worked by hand."""
import numpy as np
import pytest

from cm3leon_jax.retrieval import strategy as st
from cm3leon_jax.retrieval.strategy import Candidate as C


def ids(cands):
    return [c.doc_id for c in cands]


def test_relevance_orders_by_score_stably():
    cands = [C(1, 0.2), C(2, 0.8), C(3, 0.5), C(4, 0.8)]
    assert ids(st.by_relevance(cands)) == [2, 4, 3, 1]


def test_modality_prefers_documents_with_text_and_image():
    cands = [C(1, 0.8, has_image=False), C(2, 0.7), C(3, 0.6, has_text=False), C(4, 0.5)]
    assert ids(st.by_modality(cands)) == [2, 4, 1, 3]


def test_diversity_cut_at_0_9_is_strict():
    # 0.95 and 0.91 are near-copies of the query and go; exactly 0.9 stays
    cands = [C(1, 0.95), C(2, 0.91), C(3, 0.9), C(4, 0.3)]
    assert ids(st.diverse(cands)) == [3, 4]


def test_diversity_skips_duplicates_by_id_and_content():
    cands = [C(1, 0.8, content_key="a"), C(1, 0.8), C(2, 0.7, content_key="a"), C(3, 0.6),
             C(7, 0.5)]
    assert ids(st.diverse(cands, exclude_ids=[7])) == [1, 3]


def test_select_applies_all_rules_in_order():
    cands = [C(10, 0.97), C(11, 0.85, has_image=False), C(12, 0.8), C(12, 0.8), C(13, 0.4),
             C(14, 0.6), C(99, 0.7)]
    # relevance: 10 .97, 11 .85, 12 .8, 12 .8, 99 .7, 14 .6, 13 .4
    # modality: 10, 12, 12, 99, 14, 13 | 11;  diversity: drop 10 (> 0.9), the 2nd 12, 99 (query)
    assert ids(st.select(cands, num_retrieved=3, exclude_ids=[99])) == [12, 14, 13]
    assert ids(st.select(cands, num_retrieved=10, exclude_ids=[99])) == [12, 14, 13, 11]
    assert ids(st.select(cands, num_retrieved=2, prefer_multimodal=False, exclude_ids=[99])) == [11, 12]
    assert st.select([], num_retrieved=2) == []
    with pytest.raises(ValueError, match="num_retrieved"):
        st.select(cands, num_retrieved=-1)


def test_query_dropout_rate_within_tolerance_over_many_draws():
    rng = np.random.default_rng(0)
    tokens = list(range(50))
    kept = [st.query_dropout(tokens, rng) for _ in range(2000)]
    rate = 1 - np.mean([len(k) for k in kept]) / len(tokens)
    # 100,000 Bernoulli(0.2) draws: std of the rate is ~0.0013
    assert abs(rate - 0.2) < 0.006, rate
    assert all(k == sorted(k) and set(k) <= set(tokens) for k in kept[:50])  # order kept


def test_query_dropout_edge_cases():
    rng = np.random.default_rng(1)
    assert st.query_dropout([], rng) == []
    assert st.query_dropout([5, 6], rng, rate=0.0) == [5, 6]
    for _ in range(200):  # a one-token query is never emptied
        assert st.query_dropout([5], rng, rate=0.9) == [5]
    with pytest.raises(ValueError, match="rate"):
        st.query_dropout([1], rng, rate=1.0)


def test_sampled_sets_respect_the_rules_and_favour_relevance():
    rng = np.random.default_rng(0)
    cands = [C(1, 0.95), C(2, 0.8), C(3, 0.7), C(4, -3.0), C(5, 0.6, has_image=False), C(0, 0.5)]
    sets = st.sample_retrieval_sets(cands, rng, num_sets=3, num_retrieved=2, exclude_ids=[0])
    assert len(sets) == 3 and all(len(s) == 2 for s in sets)
    for s in sets:
        assert 1 not in ids(s) and 0 not in ids(s) and len(set(ids(s))) == 2
    counts = {i: 0 for i in (2, 3, 4, 5)}
    for _ in range(2000):
        for c in st.sample_retrieval_sets(cands, rng, num_sets=1, num_retrieved=1, exclude_ids=[0])[0]:
            counts[c.doc_id] += 1
    # p ∝ exp(score): 2 > 3 > 5 >> 4
    assert counts[2] > counts[3] > counts[5] > counts[4]
    assert abs(counts[2] / 2000 - np.exp(0.8) / sum(np.exp([0.8, 0.7, -3.0, 0.6]))) < 0.04
    assert st.sample_retrieval_sets([C(1, 0.99)], rng, num_sets=2) == [[], []]
