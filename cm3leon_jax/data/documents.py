"""The document types every corpus source shares (data/sources.py's module
docstring describes the protocol): the source protocol, the skip a source
raises for an unusable document, and the index check. Layer 3: the retrieval
embedder and every source read them without importing each other."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class SkippedDocument(ValueError):
    """Document `index` of a source cannot be used; `.reason` is a short
    category for skip counts ("corrupt or truncated image", "empty document")."""

    def __init__(self, index: int, reason: str, detail: str = ""):
        self.index, self.reason = int(index), reason
        super().__init__(f"document {index}: {reason}{': ' + detail if detail else ''}")


@runtime_checkable
class DocumentSource(Protocol):
    spec: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def check_index(index, n: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"document index must be an integer, got {type(index).__name__}")
    if not 0 <= index < n:
        raise IndexError(f"document index {index} out of range [0, {n})")
    return int(index)
