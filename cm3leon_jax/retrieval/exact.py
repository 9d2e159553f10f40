"""Exact maximum inner product search: the brute-force reference.

`exact_search` scores every key of a bank against every query with one
matmul per chunk of queries and keeps the top k (argpartition, split over
threads).  `MipsIndex` uses it as its ``"brute_force"`` kind, and it is the
reference that `recall_at_k` measures an approximate (ScaNN) index against.
`as_matrix` and `check_k` are the input checks the index shares.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np


def as_matrix(x, name: str, dim: Optional[int] = None) -> np.ndarray:
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


def check_k(k) -> int:
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
    bank = as_matrix(bank, "bank")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (0 rows): nothing to search")
    queries = as_matrix(queries, "queries", dim=bank.shape[1])
    k = min(check_k(k), bank.shape[0])
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
