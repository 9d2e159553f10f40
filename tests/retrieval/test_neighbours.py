"""Neighbour table: a hand-worked bank searched exactly, the query itself
never among its candidates, ScaNN's table against the exact one, the loader's
Candidates, and the mismatched bank/index errors."""
from __future__ import annotations


import numpy as np
import pytest

from cm3leon_jax.retrieval import strategy
from cm3leon_jax.retrieval.bank import load_bank, write_bank
from cm3leon_jax.retrieval.exact import exact_search, recall_at_k
from cm3leon_jax.retrieval.index import MipsIndex
from cm3leon_jax.retrieval.synthetic import clustered_bank
from cm3leon_jax.retrieval.neighbours import NeighbourTable, build_neighbour_table, drop_self

# unit keys at angles 0, 36.87, 90, 180 and 53.13 degrees
KEYS = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8]], np.float32)
IDS = [10, 11, 12, 13, 14]
MODS = [[1, 1], [1, 0], [0, 1], [1, 1], [1, 1]]


def _bank_and_index(tmp_path, keys, ids, model="m", mods=None, **build):
    bank = str(tmp_path / "bank")
    write_bank(bank, keys, ids, embedding_model=model, modalities=mods)
    index = str(tmp_path / "index")
    MipsIndex.build(keys, ids, embedding_model=model, **build).save(index)
    return bank, index


def test_drop_self_by_hand():
    ids = np.array([[5, 7, 9], [1, 5, 3], [8, 2, -1]])
    scores = np.array([[1.0, 0.5, 0.2], [0.9, 0.8, 0.1], [0.7, 0.6, -np.inf]], np.float32)
    out_ids, out_scores = drop_self(np.array([5, 5, 4]), ids, scores)
    # row 0: self first; row 1: self in the middle; row 2: self not found -> last dropped
    np.testing.assert_array_equal(out_ids, [[7, 9], [1, 3], [8, 2]])
    np.testing.assert_array_equal(out_scores, np.float32([[0.5, 0.2], [0.9, 0.1], [0.7, 0.6]]))


def test_hand_worked_bank_brute_force(tmp_path):
    bank, index = _bank_and_index(tmp_path, KEYS, IDS, mods=MODS)
    man = build_neighbour_table(bank, index, k=2, progress=False)
    assert (man["k"], man["count"], man["index_kind"], man["recall_at_k_vs_exact"]) == (2, 5, "brute_force", 1.0)
    table = NeighbourTable(bank)
    # inner products by hand, the query's own row excluded:
    #   10=(1,0):     11 .8, 14 .6, 12 0, 13 -1
    #   11=(.8,.6):   14 .96, 10 .8, 12 .6, 13 -.8
    #   12=(0,1):     14 .8, 11 .6, 10 0 = 13 0
    #   13=(-1,0):    12 0, 14 -.6, 11 -.8, 10 -1
    #   14=(.6,.8):   11 .96, 12 .8, 10 .6, 13 -.6
    np.testing.assert_array_equal(table.ids, [[11, 14], [14, 10], [14, 11], [12, 14], [11, 12]])
    np.testing.assert_allclose(table.scores, [[.8, .6], [.96, .8], [.8, .6], [0, -.6], [.96, .8]], atol=1e-6)
    assert (table.ids != np.array(IDS)[:, None]).all()
    c = table.candidates(11)
    assert [(x.doc_id, round(x.score, 4), x.has_text, x.has_image) for x in c] == [
        (14, 0.96, True, True), (10, 0.8, True, True)]
    assert table.candidates(14)[1].has_text is False  # doc 12 is image-only
    assert c[0].content_key == f"{int(load_bank(bank).content_hashes[4]):016x}"
    # the strategy runs on them: doc 14 scores 0.96 > 0.9 against doc 11 (a near copy) and is skipped
    assert [x.doc_id for x in strategy.select(c, num_retrieved=2)] == [10]
    with pytest.raises(KeyError, match="99"):
        table.candidates(99)
    # k larger than the bank: clamped to the N - 1 other documents
    man = build_neighbour_table(bank, index, k=10, progress=False)
    assert man["k"] == 4 and NeighbourTable(bank).ids.shape == (5, 4)


def test_self_excluded_even_with_duplicate_keys(tmp_path):
    keys = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)  # three identical keys
    bank, index = _bank_and_index(tmp_path, keys, [0, 1, 2, 3])
    build_neighbour_table(bank, index, k=2, progress=False)
    t = NeighbourTable(bank)
    np.testing.assert_array_equal(t.ids[:3], [[1, 2], [0, 2], [0, 1]])


def test_scann_table_recall_against_exact(tmp_path):
    keys, _ = clustered_bank(2000, 32, 40, seed=4, n_queries=1)
    ids = np.arange(2000, dtype=np.int64) * 3 + 7  # ids are not row numbers
    bank, index = _bank_and_index(tmp_path, keys, ids, kind="scann", num_leaves=20, num_leaves_to_search=6)
    man = build_neighbour_table(bank, index, k=10, progress=False, recall_sample=200)
    assert man["index_kind"] == "scann" and man["recall_sample"] == 200
    table = NeighbourTable(bank)
    rows, scores = exact_search(keys, keys, 11)
    exact_ids, _ = drop_self(ids, ids[rows], scores)
    recall = recall_at_k(table.ids, exact_ids)
    assert recall >= 0.95, recall
    assert abs(man["recall_at_k_vs_exact"] - recall) < 0.03
    assert (table.ids != ids[:, None]).all()


def test_mismatched_bank_and_index(tmp_path):
    bank, index = _bank_and_index(tmp_path, KEYS, IDS)
    other = tmp_path / "other"
    MipsIndex.build(KEYS, [1, 2, 3, 4, 5], embedding_model="m").save(str(other))
    with pytest.raises(ValueError, match="was not built from bank"):
        build_neighbour_table(bank, str(other), k=2, progress=False)
    wide = tmp_path / "wide"
    MipsIndex.build(np.eye(5, 3), IDS, embedding_model="m").save(str(wide))
    with pytest.raises(ValueError, match="dimension 2 but index .* dimension 3"):
        build_neighbour_table(bank, str(wide), k=2, progress=False)
    model = tmp_path / "model"
    MipsIndex.build(KEYS, IDS, embedding_model="another").save(str(model))
    with pytest.raises(ValueError, match="'another'.*keys of 'm'"):
        build_neighbour_table(bank, str(model), k=2, progress=False)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        build_neighbour_table(bank, index, k=0, progress=False)
    with pytest.raises(FileNotFoundError, match="no neighbour table"):
        NeighbourTable(bank)
    one = tmp_path / "one"
    b1, i1 = str(one / "bank"), str(one / "index")
    write_bank(b1, KEYS[:1], [3], embedding_model="m")
    MipsIndex.build(KEYS[:1], [3], embedding_model="m").save(i1)
    with pytest.raises(ValueError, match="holds 1 document"):
        build_neighbour_table(b1, i1, k=2, progress=False)
