"""MIPS index: exact search worked by hand, ScaNN recall against exact search
on clustered banks, save/load round trips, and every bad input's error."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from cm3leon_jax.retrieval.exact import exact_search, recall_at_k
from cm3leon_jax.retrieval.index import MANIFEST_FIELDS, MipsIndex
from cm3leon_jax.retrieval.index_params import choose_params
from cm3leon_jax.retrieval.synthetic import clustered_bank

# ---------------------------------------------------------------- exact search by hand

BANK4 = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], np.float32)


def test_exact_search_by_hand():
    # q0 = (1, 0): scores 1, 0, 0.6, -1 -> rows 0, 2, 1, 3
    # q1 = (0.8, 0.6): scores 0.8, 0.6, 0.48 + 0.48 = 0.96, -0.8 -> rows 2, 0, 1, 3
    ids, scores = exact_search(BANK4, np.array([[1, 0], [0.8, 0.6]]), k=4)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, [[0, 2, 1, 3], [2, 0, 1, 3]])
    np.testing.assert_allclose(scores, [[1, 0.6, 0, -1], [0.96, 0.8, 0.6, -0.8]], atol=1e-6)
    ids2, _ = exact_search(BANK4, np.array([[0.8, 0.6]]), k=2)
    np.testing.assert_array_equal(ids2, [[2, 0]])


def test_exact_search_ties_go_to_lower_row_and_k_is_clamped():
    bank = np.array([[0, 1], [1, 0], [1, 0], [0.5, 0], [1, 0]], np.float32)
    q = np.array([[1.0, 0.0]])
    np.testing.assert_array_equal(exact_search(bank, q, 2)[0], [[1, 2]])
    np.testing.assert_array_equal(exact_search(bank, q, 3)[0], [[1, 2, 4]])
    ids, _ = exact_search(bank, q, 99)  # k > N: all N rows
    np.testing.assert_array_equal(ids, [[1, 2, 4, 3, 0]])


def test_exact_search_chunks_agree_with_one_block():
    bank, q = clustered_bank(3000, 16, 30, seed=3, n_queries=50)
    a = exact_search(bank, q, 7)
    b = exact_search(bank, q, 7, chunk_bytes=4 * 3000 * 3)  # 3 queries per chunk
    np.testing.assert_array_equal(a[0], b[0])
    full = q @ bank.T
    np.testing.assert_array_equal(a[0][:, 0], full.argmax(1))


def test_recall_at_k():
    assert recall_at_k([[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [4, 9, 8]]) == pytest.approx(4 / 6)
    assert recall_at_k([[-1, 2]], [[-1, 2]]) == 0.5  # padding never counts


# ---------------------------------------------------------------- parameters


def test_choose_params_by_size_and_overrides():
    assert choose_params(19_999, 512) == {"kind": "brute_force"}
    p = choose_params(200_000, 512)
    assert p["kind"] == "scann" and p["num_leaves"] == 316 and p["num_leaves_to_search"] == 8
    assert p["training_sample_size"] == 200_000 and p["dims_per_block"] == 2
    assert p["anisotropic_quantization_threshold"] == 0.2 and p["reorder"] == 100
    assert choose_params(10_000_000, 512)["training_sample_size"] == 250_000
    assert choose_params(200_000, 512, num_leaves=500)["num_leaves"] == 500
    assert choose_params(5_000, 64, kind="scann")["kind"] == "scann"
    with pytest.raises(ValueError, match="unknown index parameter"):
        choose_params(200_000, 512, num_leafs=5)
    with pytest.raises(ValueError, match="only apply to kind 'scann'"):
        choose_params(100, 8, num_leaves=4)
    with pytest.raises(ValueError, match="at least 1000 keys"):
        MipsIndex.build(BANK4, kind="scann")
    with pytest.raises(ValueError, match="exceeds num_leaves"):
        choose_params(200_000, 512, num_leaves_to_search=1000)


# ---------------------------------------------------------------- ScaNN recall


def _ids(n):
    return 1000 + 7 * np.arange(n)  # non-contiguous document ids


@pytest.fixture(scope="module")
def quick():
    """30,000 x 64 clustered bank (100 keys per cluster, as in the big test)
    indexed by ScaNN with the automatic parameters."""
    bank, queries = clustered_bank(30_000, 64, 300, seed=1, n_queries=500)
    ids = _ids(len(bank))
    index = MipsIndex.build(bank, ids=ids, embedding_model="clip-tiny-64")
    return bank, queries, ids, index


def test_scann_recall_quick(quick):
    bank, queries, ids, index = quick
    assert index.kind == "scann" and index.size == 30_000 and index.dim == 64
    exact_rows, exact_scores = exact_search(bank, queries, 10)
    got, scores = index.search(queries, 10)
    assert got.shape == (500, 10) and got.dtype == np.int64 and scores.dtype == np.float32
    assert set(np.unique(got)) <= set(ids.tolist())  # document ids, not rows
    assert recall_at_k(got, ids[exact_rows]) >= 0.95
    # scores are inner products of the returned documents (reordered exactly)
    rows = (got - 1000) // 7
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, bank[rows]), atol=1e-4)
    # one [D] query gives [k] results, the same as in a batch
    one_ids, one_scores = index.search(queries[3], 10)
    assert one_ids.shape == (10,)
    np.testing.assert_array_equal(one_ids, got[3])


def test_scann_pads_short_result_lists(quick):
    _, queries, _, index = quick
    # One probed leaf holds ~250 keys, fewer than k = 1,000: the rest is padding.
    got, scores = index.search(queries[:4], 1000, leaves_to_search=1)
    assert got.shape == (4, 1000)
    pad = got == -1
    assert pad.any() and np.all(scores[pad] == -np.inf) and np.isfinite(scores[~pad]).all()
    for row, p in zip(got, pad):
        assert len(set(row[~p].tolist())) == int((~p).sum())
    # more leaves, more found; out-of-range leaves are refused before ScaNN
    assert (index.search(queries[:4], 1000, leaves_to_search=8)[0] == -1).sum() < pad.sum()
    with pytest.raises(ValueError, match=r"leaves_to_search must be an integer in \[1, 122\]"):
        index.search(queries[:4], 10, leaves_to_search=123)


@pytest.mark.slow
def test_scann_recall_200k_x_512():
    t0 = time.time()
    bank, queries = clustered_bank(200_000, 512, 2000, seed=0, n_queries=1000)
    exact_rows, _ = exact_search(bank, queries, 10)
    index = MipsIndex.build(bank, embedding_model="synthetic-512")
    assert index.kind == "scann"
    got, _ = index.search(queries, 10)
    recall = recall_at_k(got, exact_rows)
    print(f"recall@10 {recall:.4f}, params {index.params}, total {time.time() - t0:.1f}s")
    assert recall >= 0.95


# ---------------------------------------------------------------- save / load


@pytest.fixture
def small():
    bank, queries = clustered_bank(500, 8, 10, seed=2, n_queries=20)
    ids = _ids(500)
    return bank, queries, ids, MipsIndex.build(bank, ids=ids, embedding_model="clip-tiny-8")


def _roundtrip(index, queries, path):
    index.save(str(path))
    man = json.load(open(path / "manifest.json"))
    for field in MANIFEST_FIELDS:
        assert field in man
    assert man["count"] == index.size and man["dim"] == index.dim and man["kind"] == index.kind
    assert man["ids_file"] == "ids.npy" and os.path.isfile(path / "ids.npy")
    # the directory can be moved: nothing in it points at its old place
    moved = path.parent / (path.name + "_moved")
    shutil.move(str(path), str(moved))
    loaded = MipsIndex.load(str(moved), expect_model=index.embedding_model)
    assert (loaded.kind, loaded.size, loaded.dim) == (index.kind, index.size, index.dim)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    a, b = index.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    return moved


def test_save_load_brute_force(small, tmp_path):
    bank, queries, ids, index = small
    assert index.kind == "brute_force"
    moved = _roundtrip(index, queries, tmp_path / "bf")
    assert os.path.isfile(moved / "embeddings.npy") and not os.path.exists(moved / "scann")
    got, scores = MipsIndex.load(str(moved)).search(queries, 5)
    rows, exact_scores = exact_search(bank, queries, 5)
    np.testing.assert_array_equal(got, ids[rows])  # exact, in document ids
    np.testing.assert_allclose(scores, exact_scores)


def test_save_load_scann(quick, tmp_path):
    _, queries, _, index = quick
    moved = _roundtrip(index, queries, tmp_path / "sc")
    assert os.path.isfile(moved / "scann" / "scann_assets.pbtxt")
    assert not os.path.exists(moved / "embeddings.npy")


def test_save_over_an_existing_index_replaces_it(small, tmp_path):
    bank, queries, ids, index = small
    index.save(str(tmp_path / "i"))
    other = MipsIndex.build(bank[:100], ids=ids[:100], embedding_model="clip-tiny-8")
    other.save(str(tmp_path / "i"))
    assert MipsIndex.load(str(tmp_path / "i")).size == 100


# ---------------------------------------------------------------- bad input


def test_query_of_wrong_dimension(small, quick):
    for index in (small[3], quick[3]):
        with pytest.raises(ValueError, match=f"dimension 5 but the index has dimension {index.dim}"):
            index.search(np.ones((2, 5), np.float32), 3)
        with pytest.raises(ValueError, match="dimension"):
            index.search(np.ones(index.dim + 1, np.float32), 3)
    with pytest.raises(ValueError, match="dimension 3 but the index has dimension 2"):
        exact_search(BANK4, np.ones((1, 3)), 1)


def test_empty_bank():
    with pytest.raises(ValueError, match="empty"):
        MipsIndex.build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        exact_search(np.zeros((0, 2), np.float32), np.ones((1, 2)), 1)
    with pytest.raises(ValueError, match="2-d"):
        MipsIndex.build(np.zeros(8, np.float32))


def test_non_finite_embeddings_and_queries(small):
    bad = BANK4.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* rows \[2\]"):
        MipsIndex.build(bad)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        exact_search(bad, BANK4, 1)
    with pytest.raises(ValueError, match="queries contain non-finite"):
        small[3].search(np.full(8, np.nan, np.float32), 1)


def test_bad_ids():
    with pytest.raises(ValueError, match=r"one id per embedding row \(4\)"):
        MipsIndex.build(BANK4, ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"duplicated value\(s\), e.g. \[7\]"):
        MipsIndex.build(BANK4, ids=[7, 8, 7, 9])
    with pytest.raises(ValueError, match="integers"):
        MipsIndex.build(BANK4, ids=[0.5, 1, 2, 3])


def test_k_below_one_and_above_size(small):
    index = small[3]
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            index.search(small[1], k)
    with pytest.raises(ValueError, match="k must be >= 1"):
        exact_search(BANK4, BANK4, 0)
    got, scores = MipsIndex.build(BANK4, ids=[10, 20, 30, 40]).search(np.array([1.0, 0.0]), 50)
    np.testing.assert_array_equal(got, [10, 30, 20, 40])  # clamped to the 4 documents


def test_missing_dir_and_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: build one"):
        MipsIndex.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        MipsIndex.load(str(tmp_path / "empty"))


def test_corrupt_manifest(small, tmp_path):
    path = tmp_path / "i"
    small[3].save(str(path))
    man = path / "manifest.json"
    good = json.load(open(man))
    man.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest .*not valid JSON.*rebuild"):
        MipsIndex.load(str(path))
    man.write_text(json.dumps({k: v for k, v in good.items() if k not in ("dim", "kind")}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['kind', 'dim'\]"):
        MipsIndex.load(str(path))
    man.write_text(json.dumps(dict(good, kind="hnsw")))
    with pytest.raises(ValueError, match="unknown kind 'hnsw'"):
        MipsIndex.load(str(path))
    man.write_text(json.dumps(dict(good, count=499)))
    with pytest.raises(ValueError, match="manifest says 499 documents"):
        MipsIndex.load(str(path))


def test_missing_payload_files(small, quick, tmp_path):
    small[3].save(str(tmp_path / "bf"))
    os.remove(tmp_path / "bf" / "embeddings.npy")
    with pytest.raises(FileNotFoundError, match="missing embeddings.npy"):
        MipsIndex.load(str(tmp_path / "bf"))
    quick[3].save(str(tmp_path / "sc"))
    shutil.rmtree(tmp_path / "sc" / "scann")
    with pytest.raises(FileNotFoundError, match="missing its ScaNN files"):
        MipsIndex.load(str(tmp_path / "sc"))
    os.remove(tmp_path / "sc" / "ids.npy")
    with pytest.raises(FileNotFoundError, match="missing its ids file"):
        MipsIndex.load(str(tmp_path / "sc"))


def test_expect_model_mismatch(small, tmp_path):
    small[3].save(str(tmp_path / "i"))
    with pytest.raises(ValueError, match="built with 'clip-tiny-8', queries come from "
                                         "'clip-vit-b32': rebuild the index"):
        MipsIndex.load(str(tmp_path / "i"), expect_model="clip-vit-b32")
    assert MipsIndex.load(str(tmp_path / "i"), expect_model="clip-tiny-8").embedding_model == "clip-tiny-8"
