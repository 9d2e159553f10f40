"""Retrieval augmentation: build `retrieved_1 <eos> retrieved_2 <eos> query <eos>`
training and inference sequences (DESIGN.md, "Sequence layout"; PAPER.md,
"Retrieval augmentation" and "Objective").

For each query document the neighbours come from a candidate provider (the
precomputed `retrieval.neighbours.NeighbourTable`: top-K per document, best
first) and are chosen by the retrieval strategy (`retrieval.strategy`):

- inference: `strategy.select` (relevance, modality, the 0.9 diversity cut,
  de-duplication; deterministic);
- training: `strategy.sample_retrieval_sets`, `num_sets` (3) retrieval sets
  per query pair, each giving one sequence (the paper's ≈4× tokens), plus
  query dropout (below).

The chosen documents' tokens are fetched by id from a document store (the
prepared dataset: anything with `by_id(doc_id) -> dict` holding `text_ids`,
`image_ids`, `has_text`, `has_image`), each laid out as `text <break> image`
or `image <break> text` (the order drawn per document, image first with
probability `image_first_prob`, 0.5 by default), and the sequence is the
retrieved documents in the strategy's order, then the query, each followed
by `<eos>`. The optional CM3 objective (`data.cm3.CM3Objective`) is applied to
every document, retrieved and query alike, before its `<eos>` (PAPER.md: all
tokens count equally, so nothing here weights the query).

Choices where the paper is silent (assumptions):

- A single-modality document is just its one half, with no `<break>`. A half
  is present when its `has_*` flag is set (defaulting to "non-empty" when the
  record lacks the flag) *and* it holds at least one token. A document with
  neither half is a ValueError naming its id.
- The query's own id is always passed in `exclude_ids`, so a table that does
  hold the query (e.g. built with approximate search, or a foreign table)
  never retrieves it.
- Query dropout. The neighbour table is precomputed without dropout. When a
  `query_embedder` ((kept tokens, query document) -> vector) and `candidate_keys` (ids ->
  [n, D] stored document keys, e.g. `BankKeys(bank_dir)`) are both given,
  each training retrieval set re-embeds the query after `query_dropout`
  (rate `query_dropout_rate`, 0.2) of its tokens and re-scores the table's
  candidates by inner product with their stored keys before the strategy
  runs; the 0.9 cut then acts on the re-scored values. The tokens dropped
  are the query's `text_ids` followed by its `image_ids` (unified ids, no
  `<break>`); the query in the sequence itself is never dropped. Only the
  table's K candidates can be re-ranked (a new search per example is not
  made). Without an embedder (the default) the table's scores are used
  as they are and there is no query dropout; inference never drops.
- Each training set draws its own document orders and CM3 masks (and, with
  the hook, its own dropout), so the `num_sets` sequences of one pair differ
  in more than the retrieved documents.
- A neighbour the store does not hold (KeyError from `by_id`) is skipped and
  counted in `missing_neighbours` (per id in `missing_neighbour_ids`), and
  the strategy runs again without it, so a set still gets `num_retrieved`
  documents when enough remain; `on_missing_neighbour="raise"` makes it an
  error instead. A query missing from the store or from the candidate
  provider is always a KeyError naming the id.
- Fewer eligible candidates than `num_retrieved` gives shorter sequences
  (possibly the query alone), not an error. Packing to the feature length is
  the pipeline's job, not this module's.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import gin
import numpy as np

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.retrieval import strategy

TEXT_FIRST = "text_first"
IMAGE_FIRST = "image_first"
ORDERS = (TEXT_FIRST, IMAGE_FIRST)


def _half(doc: dict, name: str) -> np.ndarray:
    ids = np.asarray(doc.get(f"{name}_ids", ()), np.int32).reshape(-1)
    flag = doc.get(f"has_{name}")
    present = bool(ids.size) if flag is None else bool(flag) and bool(ids.size)
    return ids if present else ids[:0]


def document_tokens(doc: dict, order: str) -> np.ndarray:
    """`text <break> image` (order "text_first") or `image <break> text`
    ("image_first"); a single-modality document is its one half (no
    `<break>`). int32; ValueError for a document with no tokens."""
    if order not in ORDERS:
        raise ValueError(f"document order must be one of {ORDERS}, got {order!r}")
    text, image = _half(doc, "text"), _half(doc, "image")
    halves = [h for h in ((text, image) if order == TEXT_FIRST else (image, text)) if h.size]
    if not halves:
        raise ValueError(f"document {doc.get('id')!r} has neither text nor image tokens")
    if len(halves) == 1:
        return halves[0].astype(np.int32, copy=True)
    return np.concatenate([halves[0], np.array([vocab_lib.BREAK_ID], np.int32), halves[1]]).astype(np.int32)


def draw_order(rng: np.random.Generator, image_first_prob: float = 0.5) -> str:
    """One document's modality order: image first with `image_first_prob`.
    Always draws one `rng.random()`."""
    if not 0.0 <= image_first_prob <= 1.0:
        raise ValueError(f"image_first_prob must lie in [0, 1], got {image_first_prob}")
    return IMAGE_FIRST if rng.random() < image_first_prob else TEXT_FIRST


def layout(docs_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """The documents concatenated in the given order (retrieved first, the
    query last), each followed by `<eos>`. int32."""
    eos = np.array([vocab_lib.EOS_ID], np.int32)
    parts = []
    for d in docs_tokens:
        parts += [np.asarray(d, np.int32).reshape(-1), eos]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


class BankKeys:
    """Stored document keys of a memory bank (`cm3leon embed` output, or a
    `retrieval.bank.Bank`) as a `candidate_keys` callable: ids -> [n, D]
    float32; KeyError naming the first id the bank lacks."""

    def __init__(self, bank):
        if isinstance(bank, str):
            from cm3leon_jax.retrieval.bank import load_bank

            bank = load_bank(bank)
        self.bank = bank

    def __call__(self, doc_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(doc_ids), np.int64)
        rows = self.bank.rows(ids)
        if (rows < 0).any():
            raise KeyError(f"document id {int(ids[rows < 0][0])} is not in the memory bank")
        return np.asarray(self.bank.embeddings[rows], np.float32)


@gin.configurable
class RetrievalAugmenter:
    """Retrieval-augmented sequences for query documents (see the module
    docstring).

    Args:
      store: anything with `by_id(doc_id) -> dict` (a `PreparedDataset`).
      candidates: anything with `candidates(doc_id) -> List[Candidate]` (a
        `NeighbourTable`).
      num_retrieved: documents retrieved per sequence (2).
      num_sets: training retrieval sets (= sequences) per query pair (3).
      diversity_threshold: the strategy's near-copy cut (0.9).
      prefer_multimodal: the strategy's modality rule.
      image_first_prob: probability that a document is laid out image first.
      objective: optional per-document transform `(tokens, rng) -> tokens`
        (a `CM3Objective`), applied to retrieved and query documents alike.
      query_embedder: optional `(kept tokens, query document) -> vector` for
        query dropout (`retrieval.query_dropout.ClipQueryEmbedder`).
      candidate_keys: optional `ids -> [n, D]` stored keys (`BankKeys`).
      query_dropout_rate: fraction of query tokens dropped (0.2).
      on_missing_neighbour: "skip" (count and re-run the strategy) or "raise".
      no_retrieval_prob: probability that a training sequence drops its
        retrieved documents (the query alone); one draw per set, after the
        sets are chosen, and no draw at all when 0 (the default, the
        paper's: every sequence is retrieval-augmented).
    """

    def __init__(self, store, candidates, num_retrieved: int = 2, num_sets: int = 3,
                 diversity_threshold: float = strategy.DIVERSITY_THRESHOLD,
                 prefer_multimodal: bool = True, image_first_prob: float = 0.5,
                 objective: Optional[Callable[[np.ndarray, np.random.Generator], np.ndarray]] = None,
                 query_embedder: Optional[Callable[[np.ndarray, dict], np.ndarray]] = None,
                 candidate_keys: Optional[Callable[[Sequence[int]], np.ndarray]] = None,
                 query_dropout_rate: float = strategy.QUERY_DROPOUT,
                 on_missing_neighbour: str = "skip",
                 no_retrieval_prob: float = 0.0):
        if num_retrieved < 0:
            raise ValueError(f"num_retrieved must be >= 0, got {num_retrieved}")
        if num_sets < 1:
            raise ValueError(f"num_sets must be >= 1, got {num_sets}")
        if not 0.0 <= image_first_prob <= 1.0:
            raise ValueError(f"image_first_prob must lie in [0, 1], got {image_first_prob}")
        if not 0.0 <= query_dropout_rate < 1.0:
            raise ValueError(f"query_dropout_rate must lie in [0, 1), got {query_dropout_rate}")
        if (query_embedder is None) != (candidate_keys is None):
            raise ValueError("query dropout re-scoring needs both query_embedder and candidate_keys "
                             "(or neither)")
        if not 0.0 <= no_retrieval_prob <= 1.0:
            raise ValueError(f"no_retrieval_prob must lie in [0, 1], got {no_retrieval_prob}")
        if on_missing_neighbour not in ("skip", "raise"):
            raise ValueError(f"on_missing_neighbour must be 'skip' or 'raise', got {on_missing_neighbour!r}")
        self.store, self.provider = store, candidates
        self.num_retrieved, self.num_sets = int(num_retrieved), int(num_sets)
        self.diversity_threshold, self.prefer_multimodal = float(diversity_threshold), bool(prefer_multimodal)
        self.image_first_prob = float(image_first_prob)
        self.objective = objective
        self.query_embedder, self.candidate_keys = query_embedder, candidate_keys
        self.query_dropout_rate = float(query_dropout_rate)
        self.on_missing_neighbour = on_missing_neighbour
        self.no_retrieval_prob = float(no_retrieval_prob)
        self.missing_neighbours = 0
        self.missing_neighbour_ids: Dict[int, int] = {}

    def enable_query_dropout(self, query_embedder: Callable[[np.ndarray, dict], np.ndarray],
                             candidate_keys: Callable[[Sequence[int]], np.ndarray]) -> None:
        """Turns on query-dropout re-scoring (both hooks, as in the constructor)."""
        self.query_embedder, self.candidate_keys = query_embedder, candidate_keys

    # -- look-ups ------------------------------------------------------------
    def _query(self, doc_id: int) -> dict:
        try:
            return self.store.by_id(doc_id)
        except KeyError as e:
            raise KeyError(f"query document id {doc_id} is not in the document store ({e})") from None

    def _candidates(self, doc_id: int) -> List[strategy.Candidate]:
        try:
            return list(self.provider.candidates(doc_id))
        except KeyError as e:
            raise KeyError(f"query document id {doc_id} has no neighbours in the candidate provider "
                           f"(neighbour table) ({e})") from None

    def _fetch(self, chosen, cache: dict, cands: list) -> Optional[list]:
        """Documents of `chosen`, or None after dropping a missing one from
        `cands` (the caller re-runs the strategy)."""
        docs = []
        for c in chosen:
            if c.doc_id not in cache:
                try:
                    cache[c.doc_id] = self.store.by_id(c.doc_id)
                except KeyError:
                    if self.on_missing_neighbour == "raise":
                        raise KeyError(f"neighbour document id {c.doc_id} is not in the document store") from None
                    self.missing_neighbours += 1
                    self.missing_neighbour_ids[c.doc_id] = self.missing_neighbour_ids.get(c.doc_id, 0) + 1
                    cands[:] = [x for x in cands if x.doc_id != c.doc_id]
                    return None
            docs.append(cache[c.doc_id])
        return docs

    def _rescore_sets(self, query: dict, table: list, rng: np.random.Generator, n: int) -> List[list]:
        """`n` re-scored copies of the candidates, one query dropout each (the
        dropouts drawn in order, then embedded together when the embedder
        has `embed_batch(list of kept tokens, query)`)."""
        if not table:
            return [[] for _ in range(n)]
        toks = np.concatenate([_half(query, "text"), _half(query, "image")]).astype(np.int32)
        kept = [np.asarray(strategy.query_dropout(toks.tolist(), rng, self.query_dropout_rate), np.int32)
                for _ in range(n)]
        if hasattr(self.query_embedder, "embed_batch"):
            qs = np.asarray(self.query_embedder.embed_batch(kept, query), np.float64).reshape(n, -1)
        else:
            qs = np.stack([np.asarray(self.query_embedder(k, query), np.float64).reshape(-1) for k in kept])
        keys = np.asarray(self.candidate_keys([c.doc_id for c in table]), np.float64)
        if keys.shape != (len(table), qs.shape[1]):
            raise ValueError(f"candidate_keys gave shape {keys.shape} for {len(table)} candidates; the query "
                             f"embedding has dimension {qs.shape[1]}")
        scores = qs @ keys.T
        return [[strategy.Candidate(doc_id=c.doc_id, score=float(sc), has_text=c.has_text,
                                    has_image=c.has_image, content_key=c.content_key)
                 for c, sc in zip(table, row)] for row in scores]

    # -- assembly ------------------------------------------------------------
    def _example(self, query_id: int, query: dict, retrieved: list, docs: list,
                 rng: np.random.Generator, order: Optional[str]) -> dict:
        pieces, orders = [], []
        for d in docs + [query]:
            o = order if order is not None else draw_order(rng, self.image_first_prob)
            t = document_tokens(d, o)
            if self.objective is not None:
                t = np.asarray(self.objective(t, rng), np.int32)
            pieces.append(t)
            orders.append(o)
        return {"targets": layout(pieces), "query_id": query_id,
                "retrieved_ids": [int(c.doc_id) for c in retrieved],
                "retrieved_scores": [float(c.score) for c in retrieved], "orders": orders}

    def _check_order(self, order):
        if order is not None and order not in ORDERS:
            raise ValueError(f"order must be None (drawn per document) or one of {ORDERS}, got {order!r}")

    def inference_example(self, doc_id: int, rng: np.random.Generator, order: Optional[str] = None) -> dict:
        """One sequence with `strategy.select`'s neighbours (deterministic; no
        query dropout). `rng` draws the document orders (unless `order` fixes
        them for every document) and the objective's masks.

        Returns {"targets": int32 [L], "query_id", "retrieved_ids",
        "retrieved_scores", "orders" (per document, the query last)}."""
        self._check_order(order)
        doc_id = int(doc_id)
        query = self._query(doc_id)
        cands, cache = self._candidates(doc_id), {}
        while True:
            chosen = strategy.select(cands, self.num_retrieved, self.diversity_threshold,
                                     self.prefer_multimodal, exclude_ids=(doc_id,))
            docs = self._fetch(chosen, cache, cands)
            if docs is not None:
                return self._example(doc_id, query, chosen, docs, rng, order)

    def training_examples(self, doc_id: int, rng: np.random.Generator,
                          order: Optional[str] = None) -> List[dict]:
        """`num_sets` sequences for one query pair, each with a retrieval set
        from `strategy.sample_retrieval_sets` (after query-dropout re-scoring
        when the hook is configured); same dict as `inference_example`."""
        self._check_order(order)
        doc_id = int(doc_id)
        query = self._query(doc_id)
        table, cache = self._candidates(doc_id), {}
        hook = self.query_embedder is not None
        sets: List[tuple] = []  # (chosen, docs)
        if not hook:
            cands = list(table)
            while True:
                drawn = strategy.sample_retrieval_sets(
                    cands, rng, self.num_sets, self.num_retrieved, self.diversity_threshold,
                    self.prefer_multimodal, exclude_ids=(doc_id,))
                fetched = []
                for s in drawn:
                    docs = self._fetch(s, cache, cands)
                    if docs is None:
                        break  # a neighbour was missing: draw the sets again without it
                    fetched.append(docs)
                else:
                    sets = list(zip(drawn, fetched))
                    break
        else:
            table = [c for c in table if c.doc_id != doc_id]  # never re-scored, never retrieved
            missing: set = set()
            for cands in self._rescore_sets(query, table, rng, self.num_sets):
                cands = [c for c in cands if c.doc_id not in missing]
                while True:
                    drawn = strategy.sample_retrieval_sets(
                        cands, rng, 1, self.num_retrieved, self.diversity_threshold,
                        self.prefer_multimodal, exclude_ids=(doc_id,))[0]
                    before = {c.doc_id for c in cands}
                    docs = self._fetch(drawn, cache, cands)
                    if docs is not None:
                        break
                    missing |= before - {c.doc_id for c in cands}
                sets.append((drawn, docs))
        if self.no_retrieval_prob > 0:
            sets = [([], []) if rng.random() < self.no_retrieval_prob else s for s in sets]
        return [self._example(doc_id, query, chosen, docs, rng, order) for chosen, docs in sets]


def from_paths(prepared_dir: str, bank_dir: str, **kwargs) -> RetrievalAugmenter:
    """An augmenter over a prepared dataset and the neighbour table of its
    memory bank (`bank_dir/neighbours/`)."""
    from cm3leon_jax.data.prepared import PreparedDataset
    from cm3leon_jax.retrieval.neighbours import NeighbourTable

    return RetrievalAugmenter(PreparedDataset(prepared_dir), NeighbourTable(bank_dir), **kwargs)
