"""Document id -> row lookup, shared by the memory bank and prepared datasets."""
from __future__ import annotations

import numpy as np


class IdLookup:
    """Positions of document ids in an int64 id array (-1 where absent),
    by binary search over a stable argsort made once."""

    def __init__(self, ids: np.ndarray):
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = np.asarray(ids)[self.order]

    def __call__(self, doc_ids) -> np.ndarray:
        q = np.asarray(doc_ids, np.int64)
        n = len(self.sorted_ids)
        if not n:
            return np.full(q.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.sorted_ids, q), 0, n - 1)
        return np.where(self.sorted_ids[pos] == q, self.order[pos], -1)
