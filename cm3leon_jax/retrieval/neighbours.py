"""The neighbour table: every bank document's top-K retrieval candidates,
computed once with the index, so training samples retrieved documents for a
query document without searching at every step.

CM3Leon trains on retrieval-augmented sequences (PAPER.md, "Retrieval
augmentation"): each training pair gets retrieved documents chosen by the
strategy (relevance, modality, diversity) from MIPS candidates. In
pretraining the query is a bank document itself, so its own row is the best
match and is excluded here (K + 1 are searched and the query dropped; when
approximate search did not return the query, the (K + 1)-th is dropped
instead). The strategy (`strategy.select` / `sample_retrieval_sets`) then
runs on the stored candidates; its diversity rule still removes near-copies
(score > 0.9) of the query.

Saved beside the bank, as `BANK_DIR/neighbours/`:

    query_ids.npy      int64 [N]: the bank's ids, row order
    ids.npy            int64 [N, K]: candidate document ids, best first
                       (-1 pads when approximate search found fewer)
    scores.npy         float32 [N, K]: inner products (-inf for pads)
    has_text.npy       bool [N, K] \\ what `strategy.Candidate` needs per
    has_image.npy      bool [N, K]  | candidate: modalities and the
    content_hashes.npy uint64 [N, K] / content key for de-duplication
    neighbours.json    k, the index used, recall estimate (written last)

`NeighbourTable(bank_dir).candidates(doc_id)` returns `Candidate` lists.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import List, Optional

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax.retrieval.bank import load_bank
from cm3leon_jax.retrieval.clip_encoder import same_model
from cm3leon_jax.retrieval.strategy import Candidate

TABLE_DIR = "neighbours"
MANIFEST_FILE = "neighbours.json"
FORMAT_VERSION = 1
_ARRAYS = ("query_ids", "ids", "scores", "has_text", "has_image", "content_hashes")


def drop_self(query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray):
    """[Q, K+1] search results -> [Q, K] without each row's own id; a row
    that does not hold its own id loses its last column instead."""
    q, width = ids.shape
    if width < 2:
        raise ValueError("drop_self needs K + 1 >= 2 columns")
    is_self = ids == np.asarray(query_ids, np.int64)[:, None]
    # ids in a row are distinct, so each row has at most one self column
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), width - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(q), drop] = False
    return ids[keep].reshape(q, width - 1), scores[keep].reshape(q, width - 1)


def _check_pair(bank, index, bank_dir: str, index_dir: str) -> None:
    if not same_model(bank.embedding_model, index.embedding_model):
        raise ValueError(f"index {index_dir!r} was built with embedding model {index.embedding_model!r} but "
                         f"bank {bank_dir!r} holds keys of {bank.embedding_model!r}: build the index from "
                         "this bank (`cm3leon index build`)")
    if bank.dim != index.dim:
        raise ValueError(f"bank {bank_dir!r} has dimension {bank.dim} but index {index_dir!r} has dimension "
                         f"{index.dim}: build the index from this bank (`cm3leon index build`)")
    if index.size != len(bank) or not np.array_equal(np.sort(index.ids), np.sort(bank.ids)):
        raise ValueError(f"index {index_dir!r} ({index.size} documents) was not built from bank {bank_dir!r} "
                         f"({len(bank)} documents; their document ids differ): rebuild the index")


def build_neighbour_table(bank_dir: str, index_dir: str, k: int = 32, batch_size: int = 4096,
                          recall_sample: int = 256, progress: bool = True) -> dict:
    """Search the top-k candidates of every bank document (itself excluded)
    with the index in `index_dir`, write `bank_dir/neighbours/` and return
    its manifest. For a ScaNN index, recall@k against exact search is
    estimated on `recall_sample` random documents and recorded."""
    from tqdm import tqdm

    from cm3leon_jax.retrieval.exact import exact_search, recall_at_k
    from cm3leon_jax.retrieval.index import MipsIndex

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (candidates per document), got {k!r}")
    bank = load_bank(bank_dir)
    index = MipsIndex.load(index_dir)
    _check_pair(bank, index, bank_dir, index_dir)
    n = len(bank)
    if n < 2:
        raise ValueError(f"bank {bank_dir!r} holds {n} document(s): a neighbour table needs at least 2")
    k_eff = min(int(k), n - 1)
    if k_eff < k:
        print(f"warning: k={k} exceeds the {n - 1} other documents of the bank; using k={k_eff}",
              file=sys.stderr)

    ids = np.empty((n, k_eff), np.int64)
    scores = np.empty((n, k_eff), np.float32)
    bar = tqdm(total=n, unit="doc", desc="neighbours", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        found_ids, found_scores = index.search(np.asarray(bank.embeddings[s:e]), k_eff + 1)
        ids[s:e], scores[s:e] = drop_self(bank.ids[s:e], found_ids, found_scores)
        bar.update(e - s)
    bar.close()

    rows = bank.rows(ids)
    valid = rows >= 0
    safe = np.maximum(rows, 0)
    has_text = bank.modalities[safe, 0] & valid
    has_image = bank.modalities[safe, 1] & valid
    hashes = np.where(valid, bank.content_hashes[safe], np.uint64(0))

    recall = 1.0
    if index.kind != "brute_force":
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(recall_sample, n), replace=False))
        emb = np.asarray(bank.embeddings)
        ex_rows, ex_scores = exact_search(emb, emb[sample], k_eff + 1)
        ex_ids, _ = drop_self(bank.ids[sample], bank.ids[ex_rows], ex_scores)
        recall = recall_at_k(ids[sample], ex_ids)

    manifest = {
        "format_version": FORMAT_VERSION,
        "count": n,
        "k": k_eff,
        "k_requested": int(k),
        "embedding_model": bank.embedding_model,
        "bank": os.path.abspath(bank_dir),
        "index": os.path.abspath(index_dir),
        "index_kind": index.kind,
        "index_params": index.params,
        "missing_candidates": int((~valid).sum()),
        "recall_at_k_vs_exact": round(float(recall), 4),
        "recall_sample": 0 if index.kind == "brute_force" else int(min(recall_sample, n)),
    }
    final = os.path.join(bank_dir, TABLE_DIR)
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    arrays = dict(query_ids=bank.ids, ids=ids, scores=scores, has_text=has_text, has_image=has_image,
                  content_hashes=hashes)
    for name in _ARRAYS:
        np.save(os.path.join(tmp, name + ".npy"), arrays[name])
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest


class NeighbourTable:
    """Reads `bank_dir/neighbours/` (memory-mapped)."""

    def __init__(self, bank_dir: str, mmap: bool = True):
        path = os.path.join(bank_dir, TABLE_DIR)
        man_path = os.path.join(path, MANIFEST_FILE)
        if not paths_lib.isfile(man_path):  # local, or gs:// (read into memory, no mmap)
            raise FileNotFoundError(f"bank {bank_dir!r} has no neighbour table ({TABLE_DIR}/{MANIFEST_FILE}): "
                                    "make one with `cm3leon index neighbours --embeddings=BANK_DIR "
                                    "--index=INDEX_DIR`")
        try:
            with paths_lib.open(man_path) as f:
                self.manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt neighbour table manifest {man_path!r} ({e}): rebuild it") from e
        mode = "r" if mmap else None
        try:
            arrays = {name: paths_lib.load_npy(os.path.join(path, name + ".npy"), mmap_mode=mode)
                      for name in _ARRAYS}
        except (OSError, ValueError) as e:
            raise ValueError(f"neighbour table {path!r} is incomplete or unreadable ({e}): rebuild it") from e
        n, k = self.manifest.get("count"), self.manifest.get("k")
        for name, a in arrays.items():
            want = (n,) if name == "query_ids" else (n, k)
            if a.shape != want:
                raise ValueError(f"neighbour table {path!r}: {name}.npy has shape {a.shape}, the manifest "
                                 f"says {want}: rebuild it")
        self.query_ids = np.asarray(arrays["query_ids"])
        self.ids, self.scores = arrays["ids"], arrays["scores"]
        self.has_text, self.has_image = arrays["has_text"], arrays["has_image"]
        self.content_hashes = arrays["content_hashes"]
        order = np.argsort(self.query_ids, kind="stable")
        self._sorted, self._order = self.query_ids[order], order

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    def row(self, doc_id: int) -> Optional[int]:
        pos = int(np.searchsorted(self._sorted, doc_id))
        if pos < len(self) and self._sorted[pos] == doc_id:
            return int(self._order[pos])
        return None

    def candidates(self, doc_id: int) -> List[Candidate]:
        """The stored candidates of document `doc_id`, best first (pads
        dropped); KeyError when the table does not hold it."""
        r = self.row(int(doc_id))
        if r is None:
            raise KeyError(f"document id {doc_id} is not in the neighbour table")
        out = []
        for j in range(self.k):
            cid = int(self.ids[r, j])
            if cid < 0:
                continue
            out.append(Candidate(doc_id=cid, score=float(self.scores[r, j]),
                                 has_text=bool(self.has_text[r, j]), has_image=bool(self.has_image[r, j]),
                                 content_key=f"{int(self.content_hashes[r, j]):016x}"))
        return out
