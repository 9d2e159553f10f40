"""Maximum inner product search (MIPS) over document keys.

CM3Leon (section 2.1, after RA-CM3) retrieves documents for a query by MIPS
over dense keys: a document's key is the mean of the L2-normalised CLIP
embeddings of its text and its image, the query is embedded the same way, and
relevance is the inner product.  The paper searches its memory bank with
ScaNN ("Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", Guo et al. 2020): a k-means tree partitions the bank, the
probed leaves are scored with anisotropic asymmetric hashing (AH), and the
best few hundred candidates are re-scored exactly ("reordering").

Two kinds of index live here:

- ``"brute_force"``: exact search in NumPy (`exact_search`), chosen for small
  banks (fewer than `BRUTE_FORCE_MAX_N` keys) where a matmul is already fast
  and ScaNN's training would cost more than it saves;
- ``"scann"``: ScaNN tree + AH + reorder, with parameters chosen from the bank
  size by `choose_params` (each can be overridden).

`MipsIndex.search` returns the *document ids* given at build time, never row
numbers, so a bank can be any subset of a corpus.  An index is saved as a
directory::

    manifest.json    format version, kind, dimension, count, embedding model,
                     build params, ids file name, creation time (written last,
                     so a directory without it is an interrupted save)
    ids.npy          int64 document ids, one per row
    scann/           ScaNN's own serialisation (kind "scann"), or
    embeddings.npy   the float32 keys (kind "brute_force")

`clustered_bank` makes the synthetic clustered bank that the tests and
`benchmarks/retrieval.py` share.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Tuple

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Written into an index dir by `cm3leon index build --bank`: where its captions are.
INDEX_BANK_REF = "source_bank.json"
IDS_FILE = "ids.npy"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
KINDS = ("brute_force", "scann")
MANIFEST_FIELDS = ("format_version", "kind", "dim", "count", "embedding_model", "params",
                   "ids_file", "created")

# Below this many keys the automatic choice is exact NumPy search.  Why 20,000
# (measured on this 2-core machine, clustered unit-norm keys, 2,000 queries):
# at n = 20,000 x 512 brute force already serves ~3,000 queries/s (0.3 ms
# each) while ScaNN is only ~4x faster and its build (8.5 s, plus ~5 s to
# import TensorFlow) pays back after ~30,000 queries; at 5,000 x 512 it is
# 2.6x for 1.7 s of build.  CM3Leon issues one query per training example, so
# small banks (tests, tiny configs, shards) lose nothing by staying exact, and
# exact results make them deterministic.  At 200,000 x 512 the same machine
# does ~200-350 exact queries/s and the index is ~40x faster, which is where
# ScaNN is worth its build.  ScaNN also wants data: ~sqrt(n/2) leaves give
# only ~200 keys per leaf at 20,000, below which k-means leaves and AH
# codebooks are poorly fit.
BRUTE_FORCE_MAX_N = 20_000
# Forcing kind="scann" below this is refused: AH's 16 codewords per block and
# the tree's k-means have nothing to learn from, and ScaNN errors out natively
# on very small banks.
SCANN_MIN_N = 1_000

_SCANN_KEYS = ("num_leaves", "num_leaves_to_search", "training_sample_size",
               "ah_training_sample_size", "dims_per_block", "anisotropic_quantization_threshold",
               "reorder", "k")
_PARAM_KEYS = ("kind",) + _SCANN_KEYS


# --------------------------------------------------------------------------- exact search


def _as_matrix(x, name: str, dim: Optional[int] = None) -> np.ndarray:
    """float32, C-contiguous, 2-d, finite, with the expected width."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-d [rows, dim], got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} have dimension {a.shape[1]} but the index has dimension {dim}: "
                         "embed the queries with the model the index was built with "
                         "(or rebuild the index)")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = np.unique(np.nonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} contain non-finite values (NaN/inf) in {bad.size} row(s), "
                         f"e.g. rows {bad[:5].tolist()}: drop or re-embed those rows")
    return a


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (number of neighbours to return), got {k}")
    return int(k)


def _topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k largest scores, best first, ties by lower
    index.  argpartition is O(n) per row instead of a full sort; a tie that
    straddles the k-th place is rare and fixed by a stable sort of that row."""
    q, n = scores.shape
    if k >= n:
        part = np.broadcast_to(np.arange(n), (q, n)).copy()
    else:
        part = np.argpartition(scores, n - k, axis=1)[:, n - k:]
        kth = np.take_along_axis(scores, part, 1).min(axis=1)
        # More than k scores >= the k-th one means ties at the boundary, and
        # argpartition may have kept a higher index than a tied lower one.
        tied = np.nonzero((scores >= kth[:, None]).sum(axis=1) > k)[0]
        for r in tied:
            part[r] = np.argsort(-scores[r], kind="stable")[:k]
    top = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -top), axis=1)  # last key primary: score desc, then index
    return np.take_along_axis(part, order, 1)


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _topk_parallel(scores: np.ndarray, k: int) -> np.ndarray:
    """`_topk_rows` over row slices in threads.  The sgemm already uses every
    core, but argpartition is single-threaded and, at 200k keys, costs as much
    as the matmul; NumPy releases the GIL inside it, so threads split it.
    Small blocks stay on the calling thread (pool overhead > work)."""
    global _POOL
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 2 or scores.shape[0] < 2 or scores.size < (1 << 20):
        return _topk_rows(scores, k)
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="exact_search")
    bounds = np.linspace(0, scores.shape[0], min(workers, scores.shape[0]) + 1).astype(int)
    parts = _POOL.map(lambda ab: _topk_rows(scores[ab[0]:ab[1]], k), zip(bounds[:-1], bounds[1:]))
    return np.concatenate(list(parts), axis=0)


def exact_search(bank, queries, k: int, chunk_bytes: int = 1 << 27) -> Tuple[np.ndarray, np.ndarray]:
    """Brute-force MIPS: for each query the k rows of `bank` [N, D] with the
    largest inner product, best first (ties by lower row).

    Queries are processed in chunks so the [chunk, N] score block stays under
    `chunk_bytes` (128 MiB by default) whatever Q is.  k > N is clamped to N.
    Returns (row ids [Q, k] int64, scores [Q, k] float32).
    """
    bank = _as_matrix(bank, "bank")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (0 rows): nothing to search")
    queries = _as_matrix(queries, "queries", dim=bank.shape[1])
    k = min(_check_k(k), bank.shape[0])
    n = bank.shape[0]
    chunk = max(1, chunk_bytes // (4 * n))
    ids = np.empty((queries.shape[0], k), np.int64)
    scores = np.empty((queries.shape[0], k), np.float32)
    for s in range(0, queries.shape[0], chunk):
        block = queries[s:s + chunk] @ bank.T  # [c, N], BLAS sgemm on every core
        top = _topk_parallel(block, k)
        ids[s:s + chunk] = top
        scores[s:s + chunk] = np.take_along_axis(block, top, 1)
    return ids, scores


def recall_at_k(approx_ids, exact_ids) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (recall@k with k the
    width of `exact_ids`).  Padding ids (-1) never count as hits."""
    a = np.atleast_2d(np.asarray(approx_ids))
    e = np.atleast_2d(np.asarray(exact_ids))
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"recall_at_k: {a.shape[0]} approximate rows vs {e.shape[0]} exact rows")
    if e.shape[1] == 0:
        raise ValueError("recall_at_k: exact_ids has no columns")
    hits = sum(len(set(ar.tolist()) & set(er.tolist()) - {-1}) for ar, er in zip(a, e))
    return hits / float(e.size)


# --------------------------------------------------------------------------- parameters


def choose_params(n: int, dim: int, k: int = 10, **overrides) -> Dict[str, Any]:
    """ScaNN build/search parameters for a bank of `n` keys of width `dim`,
    tuned for recall@k >= 0.95 on clustered unit-norm keys.

    - n < BRUTE_FORCE_MAX_N: {"kind": "brute_force"} (see the constant's note).
    - otherwise tree + AH + reorder (Guo et al. 2020), measured on
      `clustered_bank(200_000, 512, 2_000)` (benchmarks/retrieval.py):

      num_leaves = sqrt(n / 2) (316 at 200k).  sqrt(n) balances scoring the
      centroids against scanning leaves; fewer, larger leaves cut clusters
      less often, and at equal fraction of the bank scanned recall was higher
      (316 leaves, 8 probed (2.5%): 0.97-0.98; 447 leaves, 14 probed (3.1%):
      0.967; 600 leaves, 20 probed (3.3%): 0.934).
      num_leaves_to_search = max(8, num_leaves / 40): 8 of 316 gives recall
      ~0.98 at ~40x the speed of brute force; 6 gave 0.976, 4% of 447 0.96.
      training_sample_size = min(n, 250,000) for the k-means tree.
      ah_training_sample_size = min(n, 50,000): AH fits 16 codewords per 2-d
      block, which 50k points pin down; 200k gave the same recall and took
      the build from ~50 s to ~90 s.
      dims_per_block = 2 (16 codewords each: 4 bits per 2 dims) and
      anisotropic_quantization_threshold = 0.2, the ScaNN paper's setting for
      unit-norm MIPS.
      reorder = 10 x k candidates re-scored exactly in float32: with 8 of
      316 leaves recall was 0.968 / 0.981 / 0.982 for 4 / 6 / 10 x k (2 x k:
      0.85 on 447 leaves) and 20 x k added < 0.002.  6 x k is ~10% faster
      here; 10 x k keeps a margin for keys whose AH error is larger.

      On less clustered keys more leaves must be probed: on
      clustered_bank(30_000, 64, 2_000) (15 keys per cluster, overlapping
      neighbourhoods) the automatic 8 of 122 leaves give recall 0.64 and
      64 leaves are needed for 0.97.  Check recall on real keys with
      `recall_at_k` against `exact_search` and raise num_leaves_to_search
      if it falls short (`MipsIndex.search(..., leaves_to_search=...)`
      tries a value without rebuilding).

    Any key can be overridden (`choose_params(n, d, num_leaves=1000)`,
    `kind="scann"` to force ScaNN on a bank of >= SCANN_MIN_N keys);
    unknown keys are a ValueError.
    """
    unknown = sorted(set(overrides) - set(_PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown index parameter(s) {unknown}; known: {list(_PARAM_KEYS)}")
    n, dim, k = int(n), int(dim), _check_k(k)
    if n < 1 or dim < 1:
        raise ValueError(f"choose_params needs n >= 1 and dim >= 1, got n={n}, dim={dim}")
    kind = overrides.get("kind") or ("brute_force" if n < BRUTE_FORCE_MAX_N else "scann")
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {list(KINDS)}")
    if kind == "brute_force":
        extra = sorted(set(overrides) - {"kind"})
        if extra:
            raise ValueError(f"parameters {extra} only apply to kind 'scann', but this bank of "
                             f"{n} keys gets 'brute_force': pass kind='scann' to force ScaNN")
        return {"kind": "brute_force"}
    num_leaves = max(16, int(round(math.sqrt(n / 2))))
    params = {
        "kind": "scann",
        "num_leaves": num_leaves,
        "num_leaves_to_search": max(8, int(math.ceil(num_leaves / 40))),
        "training_sample_size": min(n, 250_000),
        "ah_training_sample_size": min(n, 50_000),
        "dims_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 10 * k,
        "k": k,
    }
    params.update(overrides)
    _validate_scann_params(params, n)
    return params


def _validate_scann_params(p: Dict[str, Any], n: int) -> None:
    """Catch what ScaNN would reject natively (or silently misuse) up front."""
    if n < SCANN_MIN_N:
        raise ValueError(f"kind 'scann' needs at least {SCANN_MIN_N} keys to train its tree and "
                         f"AH codebooks, the bank has {n}: use kind='brute_force'")
    for key in ("num_leaves", "num_leaves_to_search", "training_sample_size",
                "ah_training_sample_size", "dims_per_block", "reorder", "k"):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"ScaNN parameter {key} must be a positive integer, got {v!r}")
    if p["num_leaves"] > n // 2:
        raise ValueError(f"num_leaves={p['num_leaves']} is too many for {n} keys "
                         "(k-means needs several keys per leaf): use about sqrt(n)")
    if p["num_leaves_to_search"] > p["num_leaves"]:
        raise ValueError(f"num_leaves_to_search={p['num_leaves_to_search']} exceeds "
                         f"num_leaves={p['num_leaves']}")
    thr = p.get("anisotropic_quantization_threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr):
        raise ValueError(f"anisotropic_quantization_threshold must be a finite number, got {thr!r}")


# --------------------------------------------------------------------------- the index


def _import_scann():
    # Imported lazily: `import scann` pulls in TensorFlow (~5 s), which the
    # brute-force kind and the rest of the package never need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


class MipsIndex:
    """A searchable bank of document keys; see the module docstring."""

    def __init__(self, kind: str, ids: np.ndarray, dim: int, params: Dict[str, Any],
                 embedding_model: str, embeddings: Optional[np.ndarray] = None,
                 searcher=None, created: Optional[str] = None):
        self.kind = kind
        self.ids = ids
        self._dim = int(dim)
        self.params = params
        self.embedding_model = embedding_model
        self._embeddings = embeddings
        self._searcher = searcher
        self.created = created or datetime.datetime.now(datetime.timezone.utc).isoformat()

    # ----- construction

    @classmethod
    def build(cls, embeddings, ids=None, params: Optional[Dict[str, Any]] = None,
              embedding_model: str = "unknown", **overrides) -> "MipsIndex":
        """Index `embeddings` [N, D] (cast to float32) under document `ids`
        (N distinct integers; default 0..N-1).  `params` replaces the
        automatic `choose_params(N, D)`; `overrides` adjust either.
        `embedding_model` names the key model (e.g. "clip-vit-b32") so `load`
        can refuse queries from another one."""
        emb = _as_matrix(embeddings, "embeddings")
        n, dim = emb.shape
        if n == 0:
            raise ValueError("embeddings are empty (0 rows): there is nothing to index")
        if dim == 0:
            raise ValueError("embeddings have dimension 0")
        ids = _check_ids(ids, n)
        # `params` (e.g. another index's) and `overrides` both go through
        # choose_params, so unknown keys and bad values are caught the same way.
        given = dict(params or {}, **overrides)
        given.pop("build_sec", None)  # a measurement, not a setting
        params = choose_params(n, dim, given.pop("k", 10), **given)
        if not isinstance(embedding_model, str) or not embedding_model:
            raise ValueError(f"embedding_model must be a non-empty string, got {embedding_model!r}")
        if params["kind"] == "brute_force":
            return cls("brute_force", ids, dim, params, embedding_model, embeddings=emb)
        scann = _import_scann()
        p = params
        t0 = time.time()
        try:
            searcher = (scann.builder(emb, p["k"], "dot_product")
                        .tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                              training_sample_size=p["training_sample_size"])
                        .score_ah(p["dims_per_block"],
                                  anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"],
                                  training_sample_size=p["ah_training_sample_size"])
                        .reorder(p["reorder"])
                        .build())
        except RuntimeError as e:
            raise ValueError(f"ScaNN could not build an index over {n} x {dim} keys with {p}: {e}; "
                             "use fewer leaves or kind='brute_force'") from e
        params = dict(params, build_sec=round(time.time() - t0, 3))
        return cls("scann", ids, dim, params, embedding_model, searcher=searcher)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return self._dim

    def __repr__(self) -> str:
        return (f"MipsIndex(kind={self.kind!r}, size={self.size}, dim={self.dim}, "
                f"embedding_model={self.embedding_model!r})")

    # ----- search

    def search(self, queries, k: int, leaves_to_search: Optional[int] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k documents by inner product for each query.

        `queries` is [Q, D] or a single [D] vector.  Returns (doc ids [Q, k]
        int64, scores [Q, k] float32), best first; for a [D] query both are
        [k].  k larger than the index is clamped to `size`.  The ScaNN kind is
        approximate and may find fewer than k candidates in the leaves it
        probes; missing places are filled with id -1 and score -inf.
        `leaves_to_search` overrides the built-in num_leaves_to_search for
        this call (ScaNN kind; the exact kind has no leaves and ignores it).
        """
        k = min(_check_k(k), self.size)
        if leaves_to_search is not None and self.kind == "scann":
            nl = self.params["num_leaves"]
            if (isinstance(leaves_to_search, bool) or not isinstance(leaves_to_search, (int, np.integer))
                    or not 1 <= leaves_to_search <= nl):
                raise ValueError(f"leaves_to_search must be an integer in [1, {nl}] (the index has "
                                 f"{nl} leaves), got {leaves_to_search!r}")
        q = np.asarray(queries)
        single = q.ndim == 1
        if single:
            q = q[None, :]
        # Checked here, before ScaNN sees it: a wrong width is a native crash
        # or silent garbage there.
        q = _as_matrix(q, "queries", dim=self.dim)
        if q.shape[0] == 0:
            rows = np.empty((0, k), np.int64)
            scores = np.empty((0, k), np.float32)
        elif self.kind == "brute_force":
            rows, scores = exact_search(self._embeddings, q, k)
        else:
            rows, scores = self._scann_search(q, k, leaves_to_search)
        doc_ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        if single:
            return doc_ids[0], scores[0]
        return doc_ids, scores

    def _scann_search(self, q: np.ndarray, k: int, leaves: Optional[int]
                      ) -> Tuple[np.ndarray, np.ndarray]:
        p = self.params
        # The reorder budget was tuned for p["k"] neighbours; keep the same
        # candidates-per-neighbour ratio when a caller asks for more.
        pre = max(p["reorder"], -(-p["reorder"] * k // p["k"]), k)
        # The parallel path splits the batch over ScaNN's thread pool (NumPy's
        # BLAS uses every core for brute force, so this is the fair match).
        fn = self._searcher.search_batched_parallel if q.shape[0] >= 64 else self._searcher.search_batched
        rows, scores = fn(q, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
                          leaves_to_search=int(leaves or p["num_leaves_to_search"]))
        rows = np.asarray(rows, np.int64)
        scores = np.asarray(scores, np.float32)
        # ScaNN pads short result lists with row 0 and a NaN score.
        missing = ~np.isfinite(scores)
        if missing.any():
            rows[missing] = -1
            scores[missing] = -np.inf
        return rows, scores

    # ----- persistence

    def save(self, path: str) -> str:
        """Write the index to directory `path` (created if needed; an index
        already there is replaced).  The manifest is written last."""
        os.makedirs(path, exist_ok=True)
        man = os.path.join(path, MANIFEST_FILE)
        if os.path.exists(man):
            os.remove(man)  # until the new manifest lands, the dir reads as incomplete
        for stale in (SCANN_DIR, EMBEDDINGS_FILE):
            full = os.path.join(path, stale)
            if os.path.isdir(full):
                shutil.rmtree(full)
            elif os.path.exists(full):
                os.remove(full)
        np.save(os.path.join(path, IDS_FILE), self.ids)
        if self.kind == "brute_force":
            np.save(os.path.join(path, EMBEDDINGS_FILE), self._embeddings)
        else:
            sdir = os.path.join(path, SCANN_DIR)
            os.makedirs(sdir)
            # relative paths in scann_assets.pbtxt, so the directory can be moved
            self._searcher.serialize(sdir, relative_path=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "count": self.size,
            "embedding_model": self.embedding_model,
            "params": self.params,
            "ids_file": IDS_FILE,
            "created": self.created,
        }
        tmp = man + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.replace(tmp, man)
        return path

    @classmethod
    def load(cls, path: str, expect_model: Optional[str] = None) -> "MipsIndex":
        """Read an index written by `save`.  With `expect_model`, refuse an
        index whose keys came from another embedding model (their inner
        products with the queries would be meaningless)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"index directory {path!r} does not exist: build one with "
                                    "MipsIndex.build(...).save(path)")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"index path {path!r} is a file, not an index directory")
        man_path = os.path.join(path, MANIFEST_FILE)
        if not os.path.isfile(man_path):
            raise FileNotFoundError(f"{path!r} has no {MANIFEST_FILE}: it is not a MipsIndex "
                                    "directory or its save was interrupted; rebuild the index")
        try:
            with open(man_path) as f:
                man = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt manifest {man_path!r} (not valid JSON: {e}); "
                             "rebuild the index") from e
        if not isinstance(man, dict):
            raise ValueError(f"corrupt manifest {man_path!r}: expected a JSON object; rebuild the index")
        missing = [f for f in MANIFEST_FIELDS if f not in man]
        if missing:
            raise ValueError(f"corrupt manifest {man_path!r}: missing field(s) {missing}; "
                             "rebuild the index")
        if man["format_version"] != FORMAT_VERSION:
            raise ValueError(f"index {path!r} has format version {man['format_version']!r}, this code "
                             f"reads version {FORMAT_VERSION}: rebuild the index")
        kind, dim, count, params = man["kind"], man["dim"], man["count"], man["params"]
        if kind not in KINDS:
            raise ValueError(f"corrupt manifest {man_path!r}: unknown kind {kind!r} "
                             f"(expected one of {list(KINDS)}); rebuild the index")
        for name, v in (("dim", dim), ("count", count)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"corrupt manifest {man_path!r}: {name} must be a positive "
                                 f"integer, got {v!r}; rebuild the index")
        if not isinstance(params, dict) or (kind == "scann" and any(key not in params for key in _SCANN_KEYS)):
            raise ValueError(f"corrupt manifest {man_path!r}: params {params!r} are incomplete "
                             f"for kind {kind!r}; rebuild the index")
        if expect_model is not None and expect_model != man["embedding_model"]:
            raise ValueError(f"index {path!r} was built with {man['embedding_model']!r}, queries "
                             f"come from {expect_model!r}: rebuild the index with {expect_model!r} "
                             "keys (inner products across embedding models are meaningless)")
        ids_path = os.path.join(path, str(man["ids_file"]))
        if not os.path.isfile(ids_path):
            raise FileNotFoundError(f"index {path!r} is missing its ids file {man['ids_file']!r}: "
                                    "rebuild the index")
        ids = np.load(ids_path, allow_pickle=False)
        if ids.ndim != 1 or ids.shape[0] != count:
            raise ValueError(f"index {path!r}: ids file holds shape {ids.shape}, the manifest says "
                             f"{count} documents; rebuild the index")
        ids = _check_ids(ids, count)
        common = dict(kind=kind, ids=ids, dim=dim, params=params,
                      embedding_model=man["embedding_model"], created=man["created"])
        if kind == "brute_force":
            emb_path = os.path.join(path, EMBEDDINGS_FILE)
            if not os.path.isfile(emb_path):
                raise FileNotFoundError(f"index {path!r} (kind brute_force) is missing "
                                        f"{EMBEDDINGS_FILE}: rebuild the index")
            emb = np.load(emb_path, allow_pickle=False)
            if emb.shape != (count, dim) or emb.dtype != np.float32:
                raise ValueError(f"index {path!r}: {EMBEDDINGS_FILE} is {emb.dtype} {emb.shape}, "
                                 f"the manifest says float32 ({count}, {dim}); rebuild the index")
            return cls(embeddings=emb, **common)
        sdir = os.path.join(path, SCANN_DIR)
        if not os.path.isfile(os.path.join(sdir, "scann_assets.pbtxt")):
            # Checked here: ScaNN's loader would otherwise try a back-compat
            # rewrite of the directory before failing.
            raise FileNotFoundError(f"index {path!r} (kind scann) is missing its ScaNN files "
                                    f"({SCANN_DIR}/scann_assets.pbtxt): rebuild the index")
        scann = _import_scann()
        try:
            searcher = scann.load_searcher(sdir, assets_backcompat_shim=False)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"index {path!r}: ScaNN could not load {sdir!r} ({e}); "
                             "rebuild the index") from e
        if searcher.size() != count:
            raise ValueError(f"index {path!r}: the ScaNN searcher holds {searcher.size()} keys, the "
                             f"manifest says {count}; rebuild the index")
        return cls(searcher=searcher, **common)


def _check_ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    a = np.asarray(ids)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"ids must be a 1-d array with one id per embedding row ({n}), "
                         f"got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers (document ids), got dtype {a.dtype}")
    a = a.astype(np.int64)
    if (a < 0).any():
        raise ValueError("ids must be >= 0 (-1 marks a missing result in search output)")
    uniq, counts = np.unique(a, return_counts=True)
    if uniq.shape[0] != n:
        dup = uniq[counts > 1]
        raise ValueError(f"ids contain {dup.size} duplicated value(s), e.g. {dup[:5].tolist()}: "
                         "each document needs a distinct id")
    return a


# --------------------------------------------------------------------------- synthetic data


def clustered_bank(n: int, dim: int, n_clusters: int, seed: int, *, n_queries: int = 1000,
                   noise: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """A synthetic bank of unit-norm keys with cluster structure, standing in
    for CLIP keys (which cluster by topic): `n_clusters` random unit centres,
    each point = centre + Gaussian noise of expected norm `noise`, then
    L2-normalised.  Queries are fresh points drawn the same way (so they are
    not bank members).  Returns (bank [n, dim], queries [n_queries, dim]),
    both float32; generated in chunks so memory stays ~ the output."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = np.float32(noise / math.sqrt(dim))

    def draw(m):
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 65536):
            c = min(65536, m - s)
            x = rng.standard_normal((c, dim), dtype=np.float32)
            x *= sigma
            x += centres[rng.integers(0, n_clusters, c)]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:s + c] = x
        return out

    return draw(n), draw(n_queries)
