"""A synthetic clustered bank of unit-norm keys (CLIP keys' stand-in), shared
by the retrieval tests and `benchmarks/retrieval.py`."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


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
