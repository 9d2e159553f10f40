"""The CM3 causal-masked objective as pure numpy functions on token arrays.

CM3 (Aghajanyan et al., 2022, "CM3: A Causal Masked Multimodal Model of the
Internet"), used by CM3Leon (PAPER.md, "Objective"): a few spans of a document
are cut out, each replaced in place by a sentinel `<mask:k>`, and moved to the
end of the document behind the same sentinel. The model is then trained with
the plain next-token loss over the whole transformed sequence, so it learns
ordinary left-to-right generation *and* infilling with bidirectional context
(everything after a span is visible when the span is generated at the end).

A document here is a 1-D array of unified-vocabulary ids (cm3leon_jax/vocab.py)
such as `text <break> image` or `image <break> text`, without the trailing
`<eos>` (the caller appends `<eos>` after the transformed document). The
maximal runs of tokens between `<break>`s are the document's *segments*; a
masked span always lies inside one segment, so it never contains or crosses a
`<break>`.

Layout of a masked document with spans s_0 < s_1 < ... < s_{n-1} (numbered in
order of appearance):

    doc with s_k -> <mask:k>   <infill>   <mask:0> s_0   <mask:1> s_1 ...

For example `[a b c d e f]` with spans `b c` and `e` becomes
`[a <mask:0> d <mask:1> f <infill> <mask:0> b c <mask:1> e]`.

Assumption (not fixed by PAPER.md): `<infill>` separates the masked document
from the appended spans, as the CM3 paper's infill marker; it also makes a
masked document recognisable (`is_masked`) and the layout unambiguous to
invert (`cm3_inverse`).

Every original token appears exactly once in the output; only `n` sentinels
(twice each) and one `<infill>` are added, so the output has `len(doc) + 2n + 1`
tokens (or `len(doc)` when nothing is masked).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import gin
import numpy as np

from cm3leon_jax import vocab as vocab_lib

Span = tuple[int, int]  # half-open [start, end) positions in the document

_DEFAULT_VOCAB = vocab_lib.UnifiedVocabulary()


# -- validation ----------------------------------------------------------------
def _check_document(tokens, vocab: vocab_lib.UnifiedVocabulary) -> np.ndarray:
    """`tokens` as a 1-D integer array, or ValueError naming what is wrong."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"CM3: a document must be a 1-D token array; got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"CM3: a document must hold integer token ids; got dtype {tokens.dtype}")
    if tokens.size == 0:
        return tokens
    if tokens.min() < 0 or tokens.max() >= vocab.size:
        raise ValueError(f"CM3: token ids must lie in [0, {vocab.size}); got "
                         f"[{tokens.min()}, {tokens.max()}]")
    forbidden = {"<pad>": tokens == vocab.pad_id, "<eos>": tokens == vocab.eos_id,
                 "<infill>": tokens == vocab.infill_id, "<mask:i>": vocab.is_mask(tokens)}
    for name, hit in forbidden.items():
        if hit.any():
            raise ValueError(f"CM3: the document already contains {name} (at position "
                             f"{int(np.flatnonzero(hit)[0])}); a document given to the CM3 "
                             "transform must not carry <pad>, <eos>, <infill> or <mask:i> ids")
    return tokens


def _check_params(vocab: vocab_lib.UnifiedVocabulary, poisson_lambda: float,
                  unmasked_rate: float, max_spans: int | None, mask_prompt_rate: float = 0.0) -> int:
    """Validates the objective's parameters; returns the effective span cap."""
    if not (math.isfinite(poisson_lambda) and poisson_lambda >= 0):
        raise ValueError(f"CM3: poisson_lambda must be finite and >= 0; got {poisson_lambda}")
    if not 0.0 <= unmasked_rate <= 1.0:
        raise ValueError(f"CM3: unmasked_rate must lie in [0, 1]; got {unmasked_rate}")
    if not 0.0 <= mask_prompt_rate <= 1.0:
        raise ValueError(f"CM3: mask_prompt_rate must lie in [0, 1]; got {mask_prompt_rate}")
    if max_spans is None:
        return vocab.num_mask_tokens
    if not 0 <= max_spans <= vocab.num_mask_tokens:
        raise ValueError(f"CM3: max_spans must lie in [0, {vocab.num_mask_tokens}] (the "
                         f"vocabulary's number of <mask:i> sentinels); got {max_spans}")
    return int(max_spans)


# -- segments and span placement -------------------------------------------------
def segments(tokens: np.ndarray, vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB
             ) -> list[Span]:
    """The maximal non-empty runs of non-`<break>` tokens, as [start, end) pairs."""
    tokens = np.asarray(tokens)
    out, start = [], 0
    for i in np.flatnonzero(tokens == vocab.break_id).tolist() + [len(tokens)]:
        if i > start:
            out.append((start, i))
        start = i + 1
    return out


def span_capacity(tokens: np.ndarray, vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB
                  ) -> int:
    """The most spans `sample_spans` can place: sum over segments of (m + 1) // 2
    for a segment of m tokens (spans are non-empty and never adjacent)."""
    return sum((e - s + 1) // 2 for s, e in segments(tokens, vocab))


def sample_spans(tokens: np.ndarray, num_spans: int, rng: np.random.Generator,
                 vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB) -> list[Span]:
    """`num_spans` spans drawn uniformly from all valid placements.

    A valid placement is a set of non-empty, pairwise non-adjacent (at least one
    unmasked token between two spans) [start, end) spans, each inside one
    segment. In a segment of m tokens there are m + 1 cut points (0..m) and a
    placement of k spans there is exactly a choice of 2k distinct cut points
    c_0 < c_1 < ... < c_{2k-1}, the spans being [c_0, c_1), [c_2, c_3), ...; so
    the segment has C(m + 1, 2k) placements. Sampling (exactly uniform over all
    placements of the document, up to float rounding of the split probabilities):

    1. Split `num_spans` among the segments, first to last: with r spans left
       and W_j(r) the number of placements of r spans in segments j, j+1, ...
       (exact integers, by convolution), segment j takes k spans with
       probability C(m_j + 1, 2k) W_{j+1}(r - k) / W_j(r), chosen by one
       `rng.random()` per segment (including segments with nothing left).
    2. In each segment with k > 0 spans, `rng.choice(m + 1, 2k, replace=False)`
       sorted gives the cut points.

    Always terminates (no rejection). Raises ValueError if `num_spans` exceeds
    `span_capacity(tokens)`. The spans come back sorted by start.
    """
    tokens = _check_document(tokens, vocab)
    if num_spans < 0:
        raise ValueError(f"CM3: num_spans must be >= 0; got {num_spans}")
    segs = segments(tokens, vocab)
    capacity = sum((e - s + 1) // 2 for s, e in segs)
    if num_spans > capacity:
        raise ValueError(f"CM3: {num_spans} spans do not fit in this document "
                         f"(at most {capacity}: non-empty, non-adjacent, within segments)")
    if num_spans == 0:
        return []
    n = num_spans
    # ways[j][r]: placements of r spans in segments j..end (exact Python ints).
    ways = [[0] * (n + 1) for _ in range(len(segs) + 1)]
    ways[len(segs)][0] = 1
    for j in range(len(segs) - 1, -1, -1):
        m = segs[j][1] - segs[j][0]
        for r in range(n + 1):
            ways[j][r] = sum(math.comb(m + 1, 2 * k) * ways[j + 1][r - k]
                             for k in range(min(r, (m + 1) // 2) + 1))
    spans: list[Span] = []
    left = n
    for j, (start, end) in enumerate(segs):
        m = end - start
        u = rng.random()
        k_max = min(left, (m + 1) // 2)
        k, acc = k_max, 0.0
        for kk in range(k_max + 1):
            w = math.comb(m + 1, 2 * kk) * ways[j + 1][left - kk]
            if w == 0:
                continue
            acc += w / ways[j][left]
            k = kk
            if u < acc:
                break
        if k:
            cuts = np.sort(rng.choice(m + 1, size=2 * k, replace=False))
            spans.extend((start + int(cuts[2 * i]), start + int(cuts[2 * i + 1]))
                         for i in range(k))
        left -= k
    assert left == 0, "CM3: span split did not place every span"  # exact weights guarantee it
    return spans


def apply_spans(tokens: np.ndarray, spans: Sequence[Span],
                vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB) -> np.ndarray:
    """The CM3 layout for explicit half-open [start, end) `spans`.

    Spans must be sorted, non-empty, non-overlapping (adjacent is allowed here),
    inside the document, free of `<break>`, and at most `vocab.num_mask_tokens`.
    No spans: the document comes back unchanged (a copy).
    """
    tokens = _check_document(tokens, vocab)
    spans = [(int(s), int(e)) for s, e in spans]
    if len(spans) > vocab.num_mask_tokens:
        raise ValueError(f"CM3: {len(spans)} spans but only {vocab.num_mask_tokens} "
                         "<mask:i> sentinels")
    prev_end = 0
    for s, e in spans:
        if not 0 <= s < e <= len(tokens):
            raise ValueError(f"CM3: span [{s}, {e}) is empty or outside a document of "
                             f"{len(tokens)} tokens")
        if s < prev_end:
            raise ValueError(f"CM3: span [{s}, {e}) overlaps or precedes the previous span; "
                             "spans must be sorted and non-overlapping")
        if (tokens[s:e] == vocab.break_id).any():
            raise ValueError(f"CM3: span [{s}, {e}) contains a <break>; spans must stay "
                             "inside one segment")
        prev_end = e
    if not spans:
        return tokens.copy()
    head, tail, pos = [], [np.array([vocab.infill_id])], 0
    for k, (s, e) in enumerate(spans):
        sentinel = np.array([vocab.mask_id(k)])
        head += [tokens[pos:s], sentinel]
        tail += [sentinel, tokens[s:e]]
        pos = e
    head.append(tokens[pos:])
    return np.concatenate(head + tail).astype(tokens.dtype)


# -- the objective -----------------------------------------------------------------
def cm3_transform(tokens: np.ndarray, rng: np.random.Generator, *,
                  vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB,
                  poisson_lambda: float = 1.0, unmasked_rate: float = 0.0,
                  max_spans: int | None = None, mask_prompt_rate: float = 0.0) -> np.ndarray:
    """One CM3 draw for one document; a pure function of (tokens, rng state).

    Draws, in this order: `u = rng.random()` (the document is left unchanged if
    `u < unmasked_rate`; drawn even when the rate is 0); only when
    `mask_prompt_rate` > 0, `v = rng.random()`: if `v < mask_prompt_rate` and
    the document has two or more segments, its first segment (the caption of
    a `text <break> image` document) is the one masked span, which is the
    layout of classifier-free guidance's unconditional stream (`<mask:0>
    <break> image ...`); otherwise `n = rng.poisson(poisson_lambda)` clipped
    to `max_spans` (default and maximum: `vocab.num_mask_tokens`) and to
    `span_capacity(tokens)`, then the spans by `sample_spans`. With n = 0 the
    document is unchanged. An unchanged document is returned as a copy (no
    `<infill>`: plain next-token).
    """
    tokens = _check_document(tokens, vocab)
    cap = _check_params(vocab, poisson_lambda, unmasked_rate, max_spans, mask_prompt_rate)
    if rng.random() < unmasked_rate:
        return tokens.copy()
    if mask_prompt_rate > 0 and rng.random() < mask_prompt_rate:
        segs = segments(tokens, vocab)
        if len(segs) > 1 and segs[0][0] == 0:
            return apply_spans(tokens, [segs[0]], vocab)
    n = min(int(rng.poisson(poisson_lambda)), cap, span_capacity(tokens, vocab))
    if n == 0:
        return tokens.copy()
    return apply_spans(tokens, sample_spans(tokens, n, rng, vocab), vocab)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CM3Objective:
    """The CM3 objective's settings (gin-configurable); call it on a document.

    Attributes:
      vocab: the unified vocabulary (sentinel ids and how many there are).
      poisson_lambda: mean of the Poisson span count (CM3: 1).
      unmasked_rate: probability that a document is left as plain next-token.
      max_spans: cap on the span count; None means `vocab.num_mask_tokens`.
      mask_prompt_rate: probability that a document's whole first segment is
        the one masked span (the unconditional stream of classifier-free
        guidance, PAPER.md "Decoding"; see `cm3_transform`).
    """

    vocab: vocab_lib.UnifiedVocabulary = dataclasses.field(
        default_factory=vocab_lib.UnifiedVocabulary)
    poisson_lambda: float = 1.0
    # The paper (PAPER.md / CM3Leon) does not give a rate of documents kept
    # unmasked; 0.0 masks every document with a Poisson draw (which is itself
    # zero with probability exp(-lambda)). Set it in gin if wanted.
    unmasked_rate: float = 0.0
    max_spans: int | None = None
    # The paper says that CFG's unconditional stream is the prompt with its
    # text replaced by <mask>, but not how often training shows that layout;
    # random CM3 spans almost never cover a whole caption. 0.0: not added.
    mask_prompt_rate: float = 0.0

    def __post_init__(self):
        _check_params(self.vocab, self.poisson_lambda, self.unmasked_rate, self.max_spans,
                      self.mask_prompt_rate)

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return cm3_transform(tokens, rng, vocab=self.vocab, poisson_lambda=self.poisson_lambda,
                             unmasked_rate=self.unmasked_rate, max_spans=self.max_spans,
                             mask_prompt_rate=self.mask_prompt_rate)


# -- inspection ----------------------------------------------------------------------
def is_masked(transformed: np.ndarray,
              vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB) -> bool:
    """Whether a `cm3_transform` output has masked spans (holds `<infill>`)."""
    return bool((np.asarray(transformed) == vocab.infill_id).any())


def cm3_inverse(transformed: np.ndarray,
                vocab: vocab_lib.UnifiedVocabulary = _DEFAULT_VOCAB) -> np.ndarray:
    """The original document of a `cm3_transform` output.

    Unmasked outputs (no `<infill>`) come back as they are (a copy). A trailing
    `<eos>`, if the caller already appended one, is kept at the end. Raises
    ValueError on a malformed layout.
    """
    x = np.asarray(transformed)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"CM3: expected a 1-D integer array; got shape {x.shape}, "
                         f"dtype {x.dtype}")
    if not is_masked(x, vocab):
        return x.copy()
    eos = x[-1:] if x[-1] == vocab.eos_id else x[:0]
    body = x[:len(x) - len(eos)]
    sep = int(np.flatnonzero(body == vocab.infill_id)[0])
    head, tail = body[:sep], body[sep + 1:]
    if (tail == vocab.infill_id).any():
        raise ValueError("CM3: more than one <infill> in a transformed document")
    tail_masks = np.flatnonzero(vocab.is_mask(tail))
    n = len(tail_masks)
    if n == 0 or tail_masks[0] != 0:
        raise ValueError("CM3: the part after <infill> must start with <mask:0>")
    if n > vocab.num_mask_tokens:
        raise ValueError(f"CM3: {n} sentinels but only {vocab.num_mask_tokens} exist")
    expected = vocab.mask_ids[:n]
    head_masks = np.flatnonzero(vocab.is_mask(head))
    if not (np.array_equal(tail[tail_masks], expected)
            and np.array_equal(head[head_masks], expected)):
        raise ValueError("CM3: sentinels before and after <infill> must both be "
                         f"<mask:0> ... <mask:{n - 1}> in order")
    bounds = list(tail_masks) + [len(tail)]
    contents = [tail[bounds[k] + 1:bounds[k + 1]] for k in range(n)]
    pieces, pos = [], 0
    for k, at in enumerate(head_masks):
        pieces += [head[pos:at], contents[k]]
        pos = at + 1
    pieces += [head[pos:], eos]
    return np.concatenate(pieces).astype(x.dtype)


def apply_per_document(sequence: np.ndarray, objective, rng: np.random.Generator,
                       eos_id: int = vocab_lib.EOS_ID) -> np.ndarray:
    """`objective(document, rng)` on every `<eos>`-terminated document of a
    sequence (`retrieved_1 <eos> ... query <eos>`), in order; the `<eos>`s
    stay where they close each document. A trailing piece without `<eos>`
    (a truncated sequence) is transformed as a document too. Documents never
    hold `<eos>`, so the split is exact; an empty document (two `<eos>` in a
    row) is kept as it is."""
    seq = np.asarray(sequence)
    if seq.ndim != 1:
        raise ValueError(f"CM3: expected a 1-D sequence, got shape {seq.shape}")
    ends = np.flatnonzero(seq == eos_id)
    pieces, start = [], 0
    for end in list(ends) + [len(seq)]:
        doc = seq[start:end]
        if doc.size:
            doc = np.asarray(objective(doc, rng), seq.dtype)
        pieces.append(doc)
        if end < len(seq):
            pieces.append(seq[end:end + 1])
        start = end + 1
    return np.concatenate(pieces).astype(seq.dtype) if pieces else seq.copy()
