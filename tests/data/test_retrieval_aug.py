"""Retrieval augmentation (cm3leon_jax/data/retrieval_aug.py): a 20-document
bank with a hand-written neighbour table, the strategy's picks (score order,
the 0.9 cut, no self-retrieval, de-duplication, modality order), the exact
`retrieved_1 <eos> retrieved_2 <eos> query <eos>` layout in both orders,
training sets, order draws, CM3 per document, the query-dropout hook and the
errors for missing ids."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from cm3leon_jax.data import cm3
from cm3leon_jax.data import retrieval_aug as ra
from cm3leon_jax.retrieval.neighbours import NeighbourTable
from cm3leon_jax.retrieval.strategy import Candidate
from cm3leon_jax.vocab import BREAK_ID, EOS_ID, UnifiedVocabulary

V = UnifiedVocabulary()
T, I = V.text_start, V.image_start
BR, EOS = BREAK_ID, EOS_ID
IDS = list(range(100, 120))  # 20 documents; ids are not row numbers
TEXT_ONLY, IMAGE_ONLY = {102}, {110}


def txt(d):  # hand-made text tokens of document d: 1 + d % 3 tokens
    return [T + 10 * d + j for j in range(1 + d % 3)]


def img(d):  # hand-made image tokens of document d: 3 tokens
    return [I + 10 * d + j for j in range(3)]


class Store:
    """In-memory document store with PreparedDataset's `by_id`."""

    def __init__(self, ids=IDS):
        self.docs = {}
        for d in ids:
            has_t, has_i = d not in IMAGE_ONLY, d not in TEXT_ONLY
            self.docs[d] = {"id": np.int64(d), "caption": f"doc {d}",
                            "text_ids": np.array(txt(d) if has_t else [], np.int32),
                            "image_ids": np.array(img(d) if has_i else [], np.int32),
                            "has_text": has_t, "has_image": has_i}

    def by_id(self, doc_id):
        if doc_id not in self.docs:
            raise KeyError(f"document id {doc_id} is not in the store")
        return self.docs[doc_id]


# The table row of query 100, stored best first as the table builder does:
# (id, score, content hash). 100 is the query itself (must be excluded), 101
# scores > 0.9 (a near copy: skipped), 104 has the same content as 103
# (duplicate: skipped), 102 is text-only (modality rule puts it after the
# multimodal ones).
ROW_100 = [(100, 1.00, 1), (101, 0.95, 2), (103, 0.85, 3), (104, 0.80, 3),
           (102, 0.70, 5), (105, 0.60, 6), (106, 0.50, 7)]
# By hand: relevance  100 101 103 104 102 105 106
#          modality   100 101 103 104 105 106 | 102
#          diversity  -100 (self) -101 (>0.9) 103 -104 (dup of 103) 105 106 102
SELECT_2 = [103, 105]
ELIGIBLE = [103, 105, 106, 102]
K = len(ROW_100)


def write_table(bank_dir, rows=None):
    """A neighbour table written by hand in `NeighbourTable`'s layout."""
    rows = dict(rows or {})
    rows.setdefault(100, ROW_100)
    n = len(IDS)
    ids = np.empty((n, K), np.int64)
    scores = np.empty((n, K), np.float32)
    hashes = np.empty((n, K), np.uint64)
    for r, q in enumerate(IDS):
        row = rows.get(q) or [(IDS[(r + j + 1) % n], 0.8 - 0.1 * j, 1000 + IDS[(r + j + 1) % n])
                              for j in range(K)]
        ids[r] = [c for c, _, _ in row]
        scores[r] = [s for _, s, _ in row]
        hashes[r] = [h for _, _, h in row]
    has_text = np.isin(ids, list(IMAGE_ONLY), invert=True)
    has_image = np.isin(ids, list(TEXT_ONLY), invert=True)
    path = os.path.join(bank_dir, "neighbours")
    os.makedirs(path)
    for name, a in dict(query_ids=np.array(IDS, np.int64), ids=ids, scores=scores, has_text=has_text,
                        has_image=has_image, content_hashes=hashes).items():
        np.save(os.path.join(path, name + ".npy"), a)
    with open(os.path.join(path, "neighbours.json"), "w") as f:
        json.dump({"format_version": 1, "count": n, "k": K}, f)
    return NeighbourTable(bank_dir)


@pytest.fixture
def table(tmp_path):
    return write_table(str(tmp_path))


def split_docs(targets):
    t = np.asarray(targets)
    assert t[-1] == EOS
    cuts = np.flatnonzero(t == EOS)
    return [t[s + 1:e] for s, e in zip(np.r_[-1, cuts[:-1]], cuts)]


# -- pieces --------------------------------------------------------------------------
def test_document_tokens_and_layout_by_hand():
    s = Store()
    np.testing.assert_array_equal(ra.document_tokens(s.by_id(101), "text_first"),
                                  [T + 1010, T + 1011, T + 1012, BR, I + 1010, I + 1011, I + 1012])
    np.testing.assert_array_equal(ra.document_tokens(s.by_id(101), "image_first"),
                                  [I + 1010, I + 1011, I + 1012, BR, T + 1010, T + 1011, T + 1012])
    for o in ra.ORDERS:  # one half: no <break>
        np.testing.assert_array_equal(ra.document_tokens(s.by_id(102), o), [T + 1020])
        np.testing.assert_array_equal(ra.document_tokens(s.by_id(110), o), [I + 1100, I + 1101, I + 1102])
    assert ra.document_tokens(s.by_id(101), "text_first").dtype == np.int32
    # a has_image=False flag wins over stray image ids
    np.testing.assert_array_equal(
        ra.document_tokens({"text_ids": [T], "image_ids": [I], "has_text": True, "has_image": False},
                           "image_first"), [T])
    with pytest.raises(ValueError, match="neither text nor image"):
        ra.document_tokens({"id": 7, "text_ids": [], "image_ids": [], "has_text": False,
                            "has_image": False}, "text_first")
    with pytest.raises(ValueError, match="order"):
        ra.document_tokens(s.by_id(101), "sideways")
    out = ra.layout([np.array([T, BR, I]), np.array([T + 1])])
    np.testing.assert_array_equal(out, [T, BR, I, EOS, T + 1, EOS])
    assert out.dtype == np.int32


# -- the acceptance test -----------------------------------------------------------------
@pytest.mark.parametrize("order", ["text_first", "image_first"])
def test_inference_example_20_document_bank(table, order):
    aug = ra.RetrievalAugmenter(Store(), table, num_retrieved=2)
    ex = aug.inference_example(100, np.random.default_rng(0), order=order)
    assert ex["query_id"] == 100
    assert ex["retrieved_ids"] == SELECT_2
    np.testing.assert_allclose(ex["retrieved_scores"], [0.85, 0.60], atol=1e-6)
    tf = order == "text_first"
    d103 = (txt(103) + [BR] + img(103)) if tf else (img(103) + [BR] + txt(103))
    d105 = (txt(105) + [BR] + img(105)) if tf else (img(105) + [BR] + txt(105))
    d100 = (txt(100) + [BR] + img(100)) if tf else (img(100) + [BR] + txt(100))
    expected = d103 + [EOS] + d105 + [EOS] + d100 + [EOS]
    # written out for text first: 103 has 2 text tokens, 105 has 1, 100 has 2
    if tf:
        assert expected == [T + 1030, T + 1031, BR, I + 1030, I + 1031, I + 1032, EOS,
                            T + 1050, BR, I + 1050, I + 1051, I + 1052, EOS,
                            T + 1000, T + 1001, BR, I + 1000, I + 1001, I + 1002, EOS]
    np.testing.assert_array_equal(ex["targets"], expected)
    assert ex["targets"].dtype == np.int32
    assert ex["orders"] == [order] * 3


def test_inference_modality_rule_and_more_neighbours(table):
    store = Store()
    ex = ra.RetrievalAugmenter(store, table, num_retrieved=4).inference_example(
        100, np.random.default_rng(0), order="text_first")
    assert ex["retrieved_ids"] == ELIGIBLE  # text-only 102 last, despite scoring above 105, 106
    docs = split_docs(ex["targets"])
    np.testing.assert_array_equal(docs[3], txt(102))  # one half, no <break>
    np.testing.assert_array_equal(docs[4], txt(100) + [BR] + img(100))
    # without the modality rule, score order: 103, 102, 105, 106
    ex = ra.RetrievalAugmenter(store, table, num_retrieved=4, prefer_multimodal=False).inference_example(
        100, np.random.default_rng(0))
    assert ex["retrieved_ids"] == [103, 102, 105, 106]
    # a lower cut also removes 103 (0.85) and 104 comes back (its duplicate is gone)
    ex = ra.RetrievalAugmenter(store, table, diversity_threshold=0.82).inference_example(
        100, np.random.default_rng(0))
    assert ex["retrieved_ids"] == [104, 105]


def test_self_excluded_even_when_the_table_holds_it_with_a_low_score(tmp_path):
    row = [(101, 0.8, 1), (100, 0.7, 2), (103, 0.6, 3), (104, 0.5, 4), (105, 0.4, 5), (106, 0.3, 6),
           (107, 0.2, 7)]
    aug = ra.RetrievalAugmenter(Store(), write_table(str(tmp_path), {100: row}))
    assert aug.inference_example(100, np.random.default_rng(0))["retrieved_ids"] == [101, 103]
    for ex in aug.training_examples(100, np.random.default_rng(1)):
        assert 100 not in ex["retrieved_ids"]


def test_inference_is_deterministic_and_orders_are_drawn_per_document(table):
    aug = ra.RetrievalAugmenter(Store(), table)
    a = aug.inference_example(100, np.random.default_rng(3))
    b = aug.inference_example(100, np.random.default_rng(3))
    np.testing.assert_array_equal(a["targets"], b["targets"])
    seen = set()
    for seed in range(40):
        ex = aug.inference_example(100, np.random.default_rng(seed))
        assert ex["retrieved_ids"] == SELECT_2
        docs = split_docs(ex["targets"])
        for d, o, got in zip([103, 105, 100], ex["orders"], docs):
            want = txt(d) + [BR] + img(d) if o == "text_first" else img(d) + [BR] + txt(d)
            np.testing.assert_array_equal(got, want)
        seen.add(tuple(ex["orders"]))
    assert len(seen) > 4  # documents of one sequence get independent orders


def test_order_fraction_matches_probability():
    rng = np.random.default_rng(0)
    n = 4000
    for p in (0.3, 0.5):
        frac = np.mean([ra.draw_order(rng, p) == "image_first" for _ in range(n)])
        assert abs(frac - p) < 0.03, (p, frac)
    assert ra.draw_order(rng, 0.0) == "text_first" and ra.draw_order(rng, 1.0) == "image_first"
    # and through the augmenter (3 documents per sequence)
    aug = ra.RetrievalAugmenter(Store(), _Provider(), image_first_prob=0.25)
    orders = [o for s in range(500) for o in aug.inference_example(100, np.random.default_rng(s))["orders"]]
    assert abs(np.mean([o == "image_first" for o in orders]) - 0.25) < 0.04


class _Provider:
    """A candidate provider without files (the NeighbourTable interface)."""

    def __init__(self, rows=None):
        self.rows = rows or {100: [Candidate(c, s, c not in IMAGE_ONLY, c not in TEXT_ONLY, str(h))
                                   for c, s, h in ROW_100]}

    def candidates(self, doc_id):
        if doc_id not in self.rows:
            raise KeyError(f"document id {doc_id} is not in the neighbour table")
        return list(self.rows[doc_id])


# -- training ---------------------------------------------------------------------------
def test_training_sets(table):
    aug = ra.RetrievalAugmenter(Store(), table, num_sets=3, num_retrieved=2)
    counts = collections.Counter()
    for seed in range(300):
        exs = aug.training_examples(100, np.random.default_rng(seed))
        assert len(exs) == 3
        for ex in exs:
            r = ex["retrieved_ids"]
            assert len(r) == 2 and len(set(r)) == 2 and set(r) <= set(ELIGIBLE)
            assert 100 not in r and 101 not in r and 104 not in r
            # the strategy's order inside a set: modality, then score
            assert r == [d for d in ELIGIBLE if d in r]
            docs = split_docs(ex["targets"])
            assert len(docs) == 3 and ex["query_id"] == 100
            for d, o, got in zip(r + [100], ex["orders"], docs):
                np.testing.assert_array_equal(got, ra.document_tokens(Store().by_id(d), o))
            counts.update(r)
    assert set(counts) == set(ELIGIBLE)
    # weights exp(score): 103 (0.85) > 102 (0.70) > 105 (0.60) > 106 (0.50)
    assert counts.most_common(1)[0][0] == 103
    assert counts[103] > counts[102] > counts[106]
    # reproducible with a fixed seed, different with another
    a = aug.training_examples(100, np.random.default_rng(7))
    b = aug.training_examples(100, np.random.default_rng(7))
    assert all(np.array_equal(x["targets"], y["targets"]) and x["retrieved_ids"] == y["retrieved_ids"]
               for x, y in zip(a, b))
    c = [aug.training_examples(100, np.random.default_rng(s)) for s in range(8, 16)]
    assert any(not np.array_equal(x["targets"], y["targets"]) for cc in c for x, y in zip(a, cc))


def test_no_retrieval_prob_drops_whole_sets(table):
    """A share of training sequences is the query alone; with 0 (the
    default) the sequences are exactly the plain augmenter's."""
    plain = ra.RetrievalAugmenter(Store(), table, num_sets=3, num_retrieved=2)
    zero = ra.RetrievalAugmenter(Store(), table, num_sets=3, num_retrieved=2, no_retrieval_prob=0.0)
    for seed in range(5):
        a = plain.training_examples(100, np.random.default_rng(seed))
        b = zero.training_examples(100, np.random.default_rng(seed))
        assert all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))
    aug = ra.RetrievalAugmenter(Store(), table, num_sets=3, num_retrieved=2, no_retrieval_prob=0.25)
    alone = 0
    for seed in range(400):
        for ex in aug.training_examples(100, np.random.default_rng(seed)):
            if not ex["retrieved_ids"]:
                alone += 1
                assert ex["orders"] and len(ex["orders"]) == 1
                np.testing.assert_array_equal(split_docs(ex["targets"])[0],
                                              ra.document_tokens(Store().by_id(100), ex["orders"][0]))
            else:
                assert len(ex["retrieved_ids"]) == 2
    assert 0.20 < alone / 1200 < 0.30  # 0.25 +- 4 standard errors
    everything = ra.RetrievalAugmenter(Store(), table, num_sets=2, num_retrieved=2, no_retrieval_prob=1.0)
    assert all(not ex["retrieved_ids"] for ex in everything.training_examples(100, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="no_retrieval_prob"):
        ra.RetrievalAugmenter(Store(), table, no_retrieval_prob=1.5)


def test_training_with_few_eligible_candidates():
    rows = {100: [Candidate(100, 1.0), Candidate(101, 0.95), Candidate(105, 0.3)]}
    aug = ra.RetrievalAugmenter(Store(), _Provider(rows), num_sets=4)
    exs = aug.training_examples(100, np.random.default_rng(0), order="image_first")
    assert len(exs) == 4 and all(ex["retrieved_ids"] == [105] for ex in exs)
    np.testing.assert_array_equal(exs[0]["targets"],
                                  img(105) + [BR] + txt(105) + [EOS] + img(100) + [BR] + txt(100) + [EOS])
    rows = {100: [Candidate(100, 1.0), Candidate(101, 0.95)]}  # nothing eligible: the query alone
    ex = ra.RetrievalAugmenter(Store(), _Provider(rows)).inference_example(100, np.random.default_rng(0),
                                                                           order="text_first")
    assert ex["retrieved_ids"] == []
    np.testing.assert_array_equal(ex["targets"], txt(100) + [BR] + img(100) + [EOS])


# -- CM3 per document ----------------------------------------------------------------------
def test_cm3_applied_per_document_and_invertible(table):
    aug = ra.RetrievalAugmenter(Store(), table, num_retrieved=4,
                                objective=cm3.CM3Objective(poisson_lambda=2.0))
    masked = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        exs = [aug.inference_example(100, rng)] + aug.training_examples(100, rng)
        for ex in exs:
            docs = split_docs(ex["targets"])
            assert len(docs) == len(ex["retrieved_ids"]) + 1
            for d, o, got in zip(ex["retrieved_ids"] + [100], ex["orders"], docs):
                masked += cm3.is_masked(got)
                np.testing.assert_array_equal(cm3.cm3_inverse(got),
                                              ra.document_tokens(Store().by_id(d), o))
    assert masked > 200  # the objective did act, on retrieved and query documents


# -- query dropout hook -----------------------------------------------------------------------
A, B = T + 1000, T + 1001  # query 100's two text tokens (its image is dropped from this store)
E_A, E_B = np.array([1.0, 0.0]), np.array([0.0, 1.0])
KEYS = {201: E_A, 202: E_B, 203: (E_A + E_B) / np.sqrt(2)}


class BagEmbedder:
    """Bag-of-tokens: counts of A and B, L2-normalised; records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, tokens, query=None):
        tokens = np.asarray(tokens)
        self.calls.append(tokens.tolist())
        v = np.array([(tokens == A).sum(), (tokens == B).sum()], np.float64)
        return v / np.linalg.norm(v)


def test_query_dropout_rescoring_is_predictable():
    store = Store(IDS + [201, 202, 203])
    store.docs[100] = dict(store.docs[100], image_ids=np.zeros(0, np.int32), has_image=False)
    # the table's (dropout-free) scores would pick 201 + 202 always
    rows = {100: [Candidate(201, 0.5), Candidate(202, 0.5), Candidate(203, 0.95), Candidate(100, 1.0)]}
    emb = BagEmbedder()
    aug = ra.RetrievalAugmenter(store, _Provider(rows), num_sets=3, num_retrieved=2, query_embedder=emb,
                                candidate_keys=lambda ids: np.stack([KEYS[i] for i in ids]),
                                query_dropout_rate=0.5)
    # By hand, from what the embedder saw (query_dropout keeps >= 1 token):
    #   [A, B] -> q = (1,1)/sqrt2: 201 .707, 202 .707, 203 1.0 (> 0.9, cut) -> {201, 202}
    #   [A]    -> q = (1,0):       201 1.0 (cut), 202 0, 203 .707          -> {202, 203}
    #   [B]    -> q = (0,1):       202 1.0 (cut), 201 0, 203 .707          -> {201, 203}
    want = {(A, B): {201, 202}, (A,): {202, 203}, (B,): {201, 203}}
    seen = collections.Counter()
    for seed in range(60):
        emb.calls.clear()
        exs = aug.training_examples(100, np.random.default_rng(seed), order="text_first")
        assert len(exs) == 3 and len(emb.calls) == 3
        for call, ex in zip(emb.calls, exs):
            assert set(ex["retrieved_ids"]) == want[tuple(call)], (call, ex["retrieved_ids"])
            seen[tuple(call)] += 1
            assert split_docs(ex["targets"])[-1].tolist() == [A, B]  # the sequence keeps the whole query
    assert set(seen) == set(want)  # every dropout case happened
    # no dropout at inference: the table's scores, so 201 and 202
    emb.calls.clear()
    assert aug.inference_example(100, np.random.default_rng(0))["retrieved_ids"] == [201, 202]
    assert emb.calls == []
    # without the hook the table's scores drive training too (203 is cut at 0.95)
    plain = ra.RetrievalAugmenter(store, _Provider(rows))
    assert all(set(ex["retrieved_ids"]) == {201, 202}
               for ex in plain.training_examples(100, np.random.default_rng(0)))


def test_query_dropout_rate_reaches_the_embedder():
    store = Store(IDS + [201, 202, 203])
    toks = np.arange(T, T + 20, dtype=np.int32)
    store.docs[100] = dict(store.docs[100], text_ids=toks[:12], image_ids=np.arange(I, I + 8, dtype=np.int32))
    rows = {100: [Candidate(201, 0.5), Candidate(202, 0.4), Candidate(203, 0.3)]}
    seen = []
    embedder = lambda t, q: (seen.append(np.asarray(t).tolist()) or np.array([0.3, 0.4]))  # noqa: E731
    aug = ra.RetrievalAugmenter(store, _Provider(rows), query_embedder=embedder,
                                candidate_keys=lambda ids: np.stack([KEYS[i] for i in ids]))
    for s in range(50):
        aug.training_examples(100, np.random.default_rng(s))
    full = toks[:12].tolist() + list(range(I, I + 8))
    for call in seen:  # text then image, in order, some dropped
        it = iter(full)
        assert all(t in it for t in call)
    assert abs(np.mean([len(c) for c in seen]) / 20 - 0.8) < 0.03
    with pytest.raises(ValueError, match="both"):
        ra.RetrievalAugmenter(store, _Provider(rows), query_embedder=embedder)


# -- errors -------------------------------------------------------------------------------------
def test_missing_ids(table):
    store = Store([d for d in IDS if d != 119])
    aug = ra.RetrievalAugmenter(store, table)
    with pytest.raises(KeyError, match="119.*document store"):
        aug.inference_example(119, np.random.default_rng(0))
    with pytest.raises(KeyError, match="119.*document store"):
        aug.training_examples(119, np.random.default_rng(0))
    store.docs[555] = store.docs[100]
    with pytest.raises(KeyError, match="555.*neighbour table"):
        aug.inference_example(555, np.random.default_rng(0))
    # a neighbour the store lacks: skipped, counted, and the strategy runs again
    # without it, so 104 (103's duplicate, no longer shadowed) is the first pick
    del store.docs[103]
    ex = aug.inference_example(100, np.random.default_rng(0))
    assert ex["retrieved_ids"] == [104, 105]
    assert aug.missing_neighbours == 1 and aug.missing_neighbour_ids == {103: 1}
    for ex in aug.training_examples(100, np.random.default_rng(0)):
        assert 103 not in ex["retrieved_ids"] and len(ex["retrieved_ids"]) == 2
    assert aug.missing_neighbours >= 1 and set(aug.missing_neighbour_ids) == {103}
    strict = ra.RetrievalAugmenter(store, table, on_missing_neighbour="raise")
    with pytest.raises(KeyError, match="neighbour document id 103"):
        strict.inference_example(100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="order"):
        aug.inference_example(100, np.random.default_rng(0), order="both")


def test_bank_keys(tmp_path):
    from cm3leon_jax.retrieval.bank import write_bank

    keys = np.eye(3, dtype=np.float32)
    write_bank(str(tmp_path / "bank"), keys, [7, 5, 9], embedding_model="m")
    bk = ra.BankKeys(str(tmp_path / "bank"))
    np.testing.assert_array_equal(bk([9, 7]), keys[[2, 0]])
    with pytest.raises(KeyError, match="6"):
        bk([5, 6])
