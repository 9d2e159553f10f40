"""The "shapes" corpus: a procedural, seeded image-caption corpus that needs no
download (DESIGN.md, "Embedded default").

Each example is one to three flat-coloured shapes on a white background with a
caption that states facts an analytic checker (`cm3leon_jax.data.shapes_check`)
can read back from pixels, so text-to-image quality is measured without any
pretrained model. The grammar and what its words mean in pixels are
`data/shapes_grammar.py`'s; this module samples scenes from it. Its names
(and those of the rendering and caption modules) are importable from here.

Example `i` of stream `seed` is drawn from `np.random.default_rng([seed, i])`
alone, so examples are random-access and the same (seed, index, resolution)
gives the same bytes every time. Positions and sizes are fractions of the image
side, so one (seed, index) gives the same scene at every resolution (64x64 for
CPU demos, 256x256 for the paper's layout). Rendering is plain numpy
point-in-shape tests at pixel centres: no antialiasing, no font, no PIL drawing.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

# Re-exported: `shapes.KINDS`, `shapes.render`, `shapes.caption_facts`, ... are the corpus's vocabulary.
from cm3leon_jax.data.shapes_caption import caption_facts, make_caption, swap_attribute  # noqa: F401
from cm3leon_jax.data.shapes_grammar import (  # noqa: F401
    BACKGROUND, COLORS, EDGE_MARGIN, GAP, KINDS, MAX_SHAPES, POSITION_MARGIN, POSITION_PHRASES, POSITIONS,
    RELATION_MARGIN, RELATION_PHRASES, RELATIONS, SIZE_THRESHOLD, SIZES, STAR_INNER_RATIO, CaptionFacts,
    Relation, ShapeFact, ShapesExample, ShapeSpec, grid_position, relation_holds, size_class)
from cm3leon_jax.data.shapes_render import render, shape_mask  # noqa: F401


def _boxes_apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    reach = (a.extent + b.extent) / 2 + GAP
    return (abs(a.center[0] - b.center[0]) >= reach
            or abs(a.center[1] - b.center[1]) >= reach)


def sample_scene(rng: np.random.Generator):
    """(shapes, relations) of one scene drawn from `rng`: 1 to `MAX_SHAPES`
    shapes, apart and inside the image, consecutive ones in their relation."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    kinds = [KINDS[k] for k in rng.integers(len(KINDS), size=n)]
    colors = [list(COLORS)[c] for c in rng.integers(len(COLORS), size=n)]
    while True:  # each pass redraws sizes and relations; a few passes at most
        sizes = [list(SIZES)[s] for s in rng.integers(len(SIZES), size=n)]
        extents = [float(rng.uniform(*SIZES[s])) for s in sizes]
        relations = tuple(Relation(k, RELATIONS[r], k + 1)
                          for k, r in enumerate(rng.integers(len(RELATIONS), size=n - 1)))
        if n == 1:
            e = extents[0]
            row, col = rng.integers(3, size=2)
            lo_img, hi_img = e / 2 + EDGE_MARGIN, 1 - e / 2 - EDGE_MARGIN
            xy = []
            for cell in (col, row):
                lo = max(cell / 3 + POSITION_MARGIN, lo_img)
                hi = min((cell + 1) / 3 - POSITION_MARGIN, hi_img)
                xy.append(float(rng.uniform(lo, hi)))
            return [ShapeSpec(kinds[0], colors[0], sizes[0], tuple(xy), e)], relations
        for _ in range(200):
            specs = []
            for k in range(n):
                lo, hi = extents[k] / 2 + EDGE_MARGIN, 1 - extents[k] / 2 - EDGE_MARGIN
                xy = tuple(float(v) for v in rng.uniform(lo, hi, size=2))
                specs.append(ShapeSpec(kinds[k], colors[k], sizes[k], xy, extents[k]))
            if (all(_boxes_apart(a, b) for j, a in enumerate(specs) for b in specs[j + 1:])
                    and all(relation_holds(r.relation, specs[r.subject].center,
                                           specs[r.object].center, RELATION_MARGIN)
                            for r in relations)):
                return specs, relations


def generate_example(seed: int, index: int, resolution: int = 64) -> ShapesExample:
    """Example `index` (>= 0) of the stream `seed` (>= 0): a pure function of its
    arguments. The scene (shapes, caption) does not depend on `resolution`."""
    return example_of_scene(*sample_scene(np.random.default_rng([int(seed), int(index)])), resolution)


def example_of_scene(specs, relations, resolution: int = 64) -> ShapesExample:
    """The example of a scene drawn by `sample_scene`: its image and caption."""
    example = ShapesExample(render(specs, resolution), "", tuple(specs), relations)
    return dataclasses.replace(example, caption=make_caption(example.facts))


def generate(seed: int, num: int, resolution: int = 64, start: int = 0) -> Iterator[ShapesExample]:
    """Examples start, start + 1, ..., start + num - 1 of the stream `seed`."""
    for index in range(start, start + num):
        yield generate_example(seed, index, resolution)
