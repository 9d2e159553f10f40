"""The paper's retrieval strategy as pure functions over candidate lists
(PAPER.md, "Retrieval augmentation"; CM3Leon section 2.1, after RA-CM3):

- relevance: candidates in MIPS-score order;
- modality: documents holding both text and image come before single-modality
  ones (the paper prefers multimodal documents);
- diversity: a candidate whose score against the query exceeds 0.9 is skipped
  (a near-copy of the query teaches nothing), and so is one already taken
  (same id, or the same content hash when given);
- query dropout: 20% of the query's tokens are dropped before it is embedded,
  in training only (a regulariser against the retriever's own bias);
- `num_retrieved` documents (2 at inference); training samples several
  retrieval sets per pair (3 by default).

Everything here takes plain Python/numpy values, so each rule is checked on a
five-candidate example by hand.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import gin
import numpy as np

DIVERSITY_THRESHOLD = 0.9
QUERY_DROPOUT = 0.2


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One search result: document id, MIPS score against the query, which
    modalities the document holds, and an optional content key for
    de-duplication (e.g. a hash of its tokens)."""

    doc_id: int
    score: float
    has_text: bool = True
    has_image: bool = True
    content_key: Optional[str] = None

    @property
    def multimodal(self) -> bool:
        return self.has_text and self.has_image


def by_relevance(candidates: Sequence[Candidate]) -> List[Candidate]:
    """Highest score first; ties keep their input order (stable)."""
    return sorted(candidates, key=lambda c: -c.score)


def by_modality(candidates: Sequence[Candidate]) -> List[Candidate]:
    """Multimodal documents first, each group keeping its input order (so
    applied after `by_relevance`, each group stays in score order)."""
    return [c for c in candidates if c.multimodal] + [c for c in candidates if not c.multimodal]


def diverse(candidates: Sequence[Candidate], threshold: float = DIVERSITY_THRESHOLD,
            exclude_ids: Sequence[int] = ()) -> List[Candidate]:
    """Drops candidates scoring > threshold against the query, and any whose
    id (or content key) was already taken earlier in the list or is in
    `exclude_ids` (e.g. the query document itself)."""
    seen_ids, seen_keys, out = set(exclude_ids), set(), []
    for c in candidates:
        if c.score > threshold or c.doc_id in seen_ids:
            continue
        if c.content_key is not None and c.content_key in seen_keys:
            continue
        seen_ids.add(c.doc_id)
        if c.content_key is not None:
            seen_keys.add(c.content_key)
        out.append(c)
    return out


@gin.configurable
def select(candidates: Sequence[Candidate], num_retrieved: int = 2,
           diversity_threshold: float = DIVERSITY_THRESHOLD, prefer_multimodal: bool = True,
           exclude_ids: Sequence[int] = ()) -> List[Candidate]:
    """Relevance, then modality, then diversity; the first `num_retrieved`."""
    if num_retrieved < 0:
        raise ValueError(f"num_retrieved must be >= 0, got {num_retrieved}")
    ordered = by_relevance(candidates)
    if prefer_multimodal:
        ordered = by_modality(ordered)
    return diverse(ordered, diversity_threshold, exclude_ids)[:num_retrieved]


@gin.configurable
def sample_retrieval_sets(candidates: Sequence[Candidate], rng: np.random.Generator,
                          num_sets: int = 3, num_retrieved: int = 2,
                          diversity_threshold: float = DIVERSITY_THRESHOLD,
                          prefer_multimodal: bool = True,
                          exclude_ids: Sequence[int] = ()) -> List[List[Candidate]]:
    """Training: `num_sets` retrieval sets for one query, each `num_retrieved`
    documents drawn without replacement from the eligible candidates (after
    the modality order and the diversity filter), with probability
    proportional to exp(score) so that relevant documents are drawn more often
    (assumption: the paper says 3 retrievals are *sampled* per pair without the
    distribution). The paper's query dropout acts on the query before search
    (`query_dropout`), so the sets also differ by the candidates themselves."""
    ordered = by_relevance(candidates)
    if prefer_multimodal:
        ordered = by_modality(ordered)
    pool = diverse(ordered, diversity_threshold, exclude_ids)
    if not pool:
        return [[] for _ in range(num_sets)]
    k = min(num_retrieved, len(pool))
    scores = np.array([c.score for c in pool], np.float64)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    sets = []
    for _ in range(num_sets):
        picks = rng.choice(len(pool), size=k, replace=False, p=p)
        # keep the strategy's order inside a set (modality, then score)
        sets.append([pool[i] for i in sorted(picks)])
    return sets


def query_dropout(tokens: Sequence[int], rng: np.random.Generator, rate: float = QUERY_DROPOUT,
                  keep_at_least: int = 1) -> List[int]:
    """Drops each token with probability `rate` (training only), keeping the
    order of the rest and at least `keep_at_least` tokens of a non-empty query
    (an empty query would embed to nothing useful)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"query dropout rate must be in [0, 1), got {rate}")
    tokens = list(tokens)
    if not tokens or rate == 0.0:
        return tokens
    keep = rng.random(len(tokens)) >= rate
    if keep.sum() < min(keep_at_least, len(tokens)):
        keep[rng.choice(len(tokens), size=min(keep_at_least, len(tokens)), replace=False)] = True
    return [t for t, k in zip(tokens, keep) if k]
