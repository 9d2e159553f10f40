"""The MIPS index over document keys: build, search, save and load.

CM3Leon (section 2.1, after RA-CM3) retrieves documents for a query by MIPS
over dense keys: a document's key is the mean of the L2-normalised CLIP
embeddings of its text and its image, the query is embedded the same way, and
relevance is the inner product.  The paper searches its memory bank with
ScaNN ("Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", Guo et al. 2020): a k-means tree partitions the bank, the
probed leaves are scored with anisotropic asymmetric hashing (AH), and the
best few hundred candidates are re-scored exactly ("reordering").

Two kinds of index live here:

- ``"brute_force"``: exact search in NumPy (`exact.exact_search`), chosen for
  small banks (fewer than `index_params.BRUTE_FORCE_MAX_N` keys) where a
  matmul is already fast and ScaNN's training would cost more than it saves;
- ``"scann"``: ScaNN tree + AH + reorder, with parameters chosen from the bank
  size by `index_params.choose_params` (each can be overridden).

`MipsIndex.search` returns the *document ids* given at build time, never row
numbers, so a bank can be any subset of a corpus.  An index is saved as a
directory::

    manifest.json    format version, kind, dimension, count, embedding model,
                     build params, ids file name, creation time (written last,
                     so a directory without it is an interrupted save)
    ids.npy          int64 document ids, one per row
    scann/           ScaNN's own serialisation (kind "scann"), or
    embeddings.npy   the float32 keys (kind "brute_force")
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from cm3leon_jax.retrieval.exact import as_matrix, check_k, exact_search
from cm3leon_jax.retrieval.index_params import KINDS, SCANN_KEYS, choose_params

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Written into an index dir by `cm3leon index build --bank`: where its captions are.
INDEX_BANK_REF = "source_bank.json"
IDS_FILE = "ids.npy"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
MANIFEST_FIELDS = ("format_version", "kind", "dim", "count", "embedding_model", "params",
                   "ids_file", "created")


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
        emb = as_matrix(embeddings, "embeddings")
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
        k = min(check_k(k), self.size)
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
        q = as_matrix(q, "queries", dim=self.dim)
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
        if not isinstance(params, dict) or (kind == "scann" and any(key not in params for key in SCANN_KEYS)):
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
