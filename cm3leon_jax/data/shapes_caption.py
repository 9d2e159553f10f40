"""Captions of the shapes grammar (`data/shapes_grammar.py`): the caption that
states a set of facts (`make_caption`), its parse (`caption_facts`), and a
caption with one attribute swapped between shapes (`swap_attribute`, the
binding probe)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from cm3leon_jax.data.shapes_grammar import (COLORS, KINDS, POSITION_PHRASES, RELATION_PHRASES, SIZES,
                                             CaptionFacts, Relation, ShapeFact)


def _shape_phrase(kind: str, color: str, size: Optional[str]) -> str:
    words = ([size] if size else []) + [color, kind]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def make_caption(facts: CaptionFacts) -> str:
    """The caption that states exactly `facts` (inverse of `caption_facts`)."""
    parts = []
    for i, s in enumerate(facts.shapes):
        if i:
            rel = [r for r in facts.relations if (r.subject, r.object) == (i - 1, i)]
            if len(rel) != 1:
                raise ValueError(f"shapes {i - 1} and {i} need exactly one relation, got {rel}")
            parts.append(RELATION_PHRASES[rel[0].relation])
        parts.append(_shape_phrase(s.kind, s.color, s.size))
        if s.position:
            parts.append(POSITION_PHRASES[s.position])
    return " ".join(parts)


_OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def swap_attribute(caption: str, attribute: str) -> Optional[str]:
    """The caption with `attribute` ("kind", "color" or "size") exchanged
    between the first two shapes that differ in it, everything else kept:
    "a red circle above a blue square" -> (kind) "a red square above a blue
    circle". For "relation", the first relation turned to its opposite (the
    two shapes' places exchanged): -> "a red circle below a blue square".
    None when no two shapes differ in it (no relation). A binding probe: a
    model that ties each word to its own shape fits the true image better
    under the caption than under the swap; a bag of words fits both alike."""
    if attribute not in ("kind", "color", "size", "relation"):
        raise ValueError(f"swap_attribute: attribute must be 'kind', 'color', 'size' or 'relation', "
                         f"got {attribute!r}")
    facts = caption_facts(caption)
    if attribute == "relation":
        if not facts.relations:
            return None
        first = facts.relations[0]
        flipped = (dataclasses.replace(first, relation=_OPPOSITE[first.relation]),) + facts.relations[1:]
        return make_caption(CaptionFacts(facts.shapes, flipped))
    shapes = list(facts.shapes)
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            a, b = getattr(shapes[i], attribute), getattr(shapes[j], attribute)
            if a is not None and b is not None and a != b:
                shapes[i] = dataclasses.replace(shapes[i], **{attribute: b})
                shapes[j] = dataclasses.replace(shapes[j], **{attribute: a})
                return make_caption(CaptionFacts(tuple(shapes), facts.relations))
    return None


_SIZE_WORDS = set(SIZES)
_PHRASE_TO_RELATION = {v: k for k, v in RELATION_PHRASES.items()}
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def caption_facts(caption: str) -> CaptionFacts:
    """Parse a caption of the grammar in the module docstring into facts.

    >>> caption_facts("a small red circle above a large blue square")
    CaptionFacts(shapes=(ShapeFact(kind='circle', color='red', size='small', position=None), \
ShapeFact(kind='square', color='blue', size='large', position=None)), \
relations=(Relation(subject=0, relation='above', object=1),))

    The size and the position may be left out (they are then None: not stated).
    Raises ValueError naming the first word that does not fit the grammar.
    """
    words = re.sub(r"[.,]", " ", caption.lower()).split()
    shapes, relations = [], []
    i = 0

    def fail(expected):
        got = repr(words[i]) if i < len(words) else "the end"
        raise ValueError(f"caption {caption!r}: expected {expected} at word {i}, got {got}")

    def match_phrase(table):
        for phrase, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
            n = len(phrase.split())
            if words[i:i + n] == phrase.split():
                return value, n
        return None, 0

    while True:
        if i >= len(words) or words[i] not in ("a", "an"):
            fail("'a' or 'an'")
        i += 1
        size = None
        if i < len(words) and words[i] in _SIZE_WORDS:
            size = words[i]
            i += 1
        if i >= len(words) or words[i] not in COLORS:
            fail(f"a colour {tuple(COLORS)}")
        color = words[i]
        i += 1
        if i >= len(words) or words[i] not in KINDS:
            fail(f"a kind {KINDS}")
        kind = words[i]
        i += 1
        position, n = match_phrase(_PHRASE_TO_POSITION)
        i += n
        shapes.append(ShapeFact(kind, color, size, position))
        if i == len(words):
            break
        relation, n = match_phrase(_PHRASE_TO_RELATION)
        if relation is None:
            fail(f"a relation {tuple(RELATION_PHRASES.values())} or the end")
        i += n
        relations.append(Relation(len(shapes) - 1, relation, len(shapes)))
    return CaptionFacts(tuple(shapes), tuple(relations))
