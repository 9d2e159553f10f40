"""The "shapes" corpus: a procedural, seeded image-caption corpus that needs no
download (DESIGN.md, "Embedded default").

Each example is one to three flat-coloured shapes on a white background with a
caption that states facts an analytic checker (`cm3leon_jax.eval.shapes_check`)
can read back from pixels, so text-to-image quality is measured without any
pretrained model.

Caption grammar (lower case, no final full stop)::

    caption   := shape [position]                       # one shape
               | shape relation shape [relation shape]  # two or three shapes
    shape     := article size colour kind
    article   := "a" | "an"                  ("an" before a vowel: "an orange")
    size      := "small" | "large"
    colour    := "red" | "green" | "blue" | "yellow" | "purple" | "orange"
    kind      := "circle" | "square" | "triangle" | "diamond" | "star"
    relation  := "above" | "below" | "to the left of" | "to the right of"
    position  := "in the top left" | "at the top"    | "in the top right"
               | "on the left"     | "in the center" | "on the right"
               | "in the bottom left" | "at the bottom" | "in the bottom right"

A relation joins *consecutive* shapes: "A above B to the left of C" states
"A above B" and "B to the left of C" (nothing about A and C). Examples:

    a large green triangle in the top left
    a small red circle above a large blue square
    a small purple star to the right of a large yellow diamond below a small red square

What the words mean in pixels (the checker uses the same definitions):

- sizes: the shape's extent (the larger side of its bounding box) is a fraction
  of the image side drawn from `SIZES` ("small" 0.20-0.24, "large"
  0.34-0.40); the checker splits at `SIZE_THRESHOLD` = 0.29. At 64x64 a
  small shape is 13-15 pixels, about two 8-pixel cells of an f=8 image
  tokenizer across: smaller ones (the first version had 10-13 pixels) lose
  their kind in the 8x8 codes (stars came back as blobs).
- kinds, each drawn to fill a box of that extent: an upright isosceles
  triangle (apex up, base = height), a diamond (square turned 45 degrees), a
  five-pointed star (inner radius `STAR_INNER_RATIO` of the outer).
- "A above B": B's bounding-box centre is lower than A's by more than their
  horizontal offset (|dy| > |dx|, y down); left/right likewise with x. The
  generator keeps a margin `RELATION_MARGIN` over that so blur cannot flip it.
- position: the cell of a 3x3 grid that holds the bounding-box centre; the
  generator keeps the centre `POSITION_MARGIN` away from cell borders.
- shapes never overlap: bounding boxes are at least `GAP` apart (rejection
  sampling) and lie `EDGE_MARGIN` inside the image. Crowded scenes that do
  not fit are redrawn, so small shapes are a little more common (~56%).

Example `i` of stream `seed` is drawn from `np.random.default_rng([seed, i])`
alone, so examples are random-access and the same (seed, index, resolution)
gives the same bytes every time. Positions and sizes are fractions of the image
side, so one (seed, index) gives the same scene at every resolution (64x64 for
CPU demos, 256x256 for the paper's layout). Rendering is plain numpy
point-in-shape tests at pixel centres: no antialiasing, no font, no PIL drawing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Optional, Sequence

import numpy as np

KINDS = ("circle", "square", "triangle", "diamond", "star")
# Well separated in RGB, and none lies near the white-to-other-colour line, so
# blurred edges (a mix of a colour and white) still classify to their colour.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
# Extent (larger bounding-box side) as a fraction of the image side.
SIZES = {"small": (0.20, 0.24), "large": (0.34, 0.40)}
SIZE_THRESHOLD = 0.29
RELATIONS = ("above", "below", "left of", "right of")
RELATION_PHRASES = {"above": "above", "below": "below",
                    "left of": "to the left of", "right of": "to the right of"}
# 3x3 grid cells by (row, column) -> name; the phrase each name takes.
POSITIONS = (("top left", "top", "top right"),
             ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
STAR_INNER_RATIO = 0.5
EDGE_MARGIN = 0.03
GAP = 0.06
RELATION_MARGIN = 0.08
POSITION_MARGIN = 0.05
MAX_SHAPES = 3


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape. `center` is the bounding-box centre (x, y), y down, and
    `extent` the larger bounding-box side, both as fractions of the image side."""
    kind: str
    color: str
    size: str
    center: tuple
    extent: float

    @property
    def position(self) -> str:
        return grid_position(*self.center)


@dataclasses.dataclass(frozen=True)
class Relation:
    """"shapes[subject] <relation> shapes[object]", relation in `RELATIONS`."""
    subject: int
    relation: str
    object: int


@dataclasses.dataclass(frozen=True)
class ShapeFact:
    """What a caption says about one shape; None where it says nothing."""
    kind: str
    color: str
    size: Optional[str] = None
    position: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CaptionFacts:
    shapes: tuple
    relations: tuple


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays
class ShapesExample:
    """One image and its caption; `shapes` and `relations` are what was drawn."""
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    shapes: tuple  # of ShapeSpec, in caption order
    relations: tuple  # of Relation between consecutive shapes

    @property
    def facts(self) -> CaptionFacts:
        """The facts the caption states, built from the scene (not the text)."""
        single = len(self.shapes) == 1
        return CaptionFacts(
            shapes=tuple(ShapeFact(s.kind, s.color, s.size, s.position if single else None)
                         for s in self.shapes),
            relations=self.relations)


# -- geometry shared with the checker ------------------------------------------

def grid_position(x: float, y: float) -> str:
    """Name of the 3x3 grid cell holding the point (x, y) in [0, 1]^2."""
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return POSITIONS[max(row, 0)][max(col, 0)]


def relation_holds(relation: str, subject_center, object_center, margin: float = 0.0) -> bool:
    """Whether "subject <relation> object" holds between two bounding-box
    centres: the offset along the relation's axis has the right sign and beats
    the offset along the other axis by more than `margin`."""
    dx = object_center[0] - subject_center[0]
    dy = object_center[1] - subject_center[1]
    along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[relation]
    across = abs(dx) if relation in ("above", "below") else abs(dy)
    return bool(along - across > margin)


def size_class(extent: float) -> str:
    return "small" if extent < SIZE_THRESHOLD else "large"


# -- rendering -------------------------------------------------------------------

def _star_vertices(cx: float, cy: float, extent: float) -> np.ndarray:
    """Five-pointed star (point up) whose bounding box is centred on (cx, cy)
    and has larger side `extent`."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    lo, hi = pts.min(0), pts.max(0)
    scale = extent / (hi - lo).max()
    return (pts - (lo + hi) / 2) * scale + np.array([cx, cy])


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over the points."""
    inside = np.zeros(np.broadcast(x, y).shape, bool)
    n = len(vertices)
    for k in range(n):
        x0, y0 = vertices[k]
        x1, y1 = vertices[(k + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def shape_mask(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """bool [H, W]: the pixels whose centres lie inside the shape."""
    coords = (np.arange(resolution) + 0.5) / resolution
    x, y = coords[None, :], coords[:, None]
    cx, cy = spec.center
    h = spec.extent / 2
    dx, dy = x - cx, y - cy
    if spec.kind == "circle":
        return dx * dx + dy * dy <= h * h
    if spec.kind == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if spec.kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if spec.kind == "triangle":  # apex (cx, cy - h), base y = cy + h, width 2h
        return (dy <= h) & (2 * np.abs(dx) <= dy + h)
    if spec.kind == "star":
        return _inside_polygon(x, y, _star_vertices(cx, cy, spec.extent))
    raise ValueError(f"unknown shape kind {spec.kind!r}; expected one of {KINDS}")


def render(shapes: Sequence[ShapeSpec], resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution, 3] image of `shapes` on the background."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = BACKGROUND
    for spec in shapes:
        image[shape_mask(spec, resolution)] = COLORS[spec.color]
    return image


# -- captions ----------------------------------------------------------------------

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


# -- sampling ------------------------------------------------------------------------

def _boxes_apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    reach = (a.extent + b.extent) / 2 + GAP
    return (abs(a.center[0] - b.center[0]) >= reach
            or abs(a.center[1] - b.center[1]) >= reach)


def _sample_scene(rng: np.random.Generator):
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
    rng = np.random.default_rng([int(seed), int(index)])
    specs, relations = _sample_scene(rng)
    example = ShapesExample(render(specs, resolution), "", tuple(specs), relations)
    return dataclasses.replace(example, caption=make_caption(example.facts))


def generate(seed: int, num: int, resolution: int = 64, start: int = 0) -> Iterator[ShapesExample]:
    """Examples start, start + 1, ..., start + num - 1 of the stream `seed`."""
    for index in range(start, start + num):
        yield generate_example(seed, index, resolution)


def _check_count_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.size != MAX_SHAPES or not np.all(np.isfinite(w)) or (w < 0).any() or w.max() <= 0:
        raise ValueError(f"shape_count_weights must be {MAX_SHAPES} non-negative weights (for 1..{MAX_SHAPES} "
                         f"shapes), not all 0; got {list(weights)}")
    return w / w.max()


def kept_indices(seed: int, num: int, shape_count_weights: Sequence[float]) -> Iterator[int]:
    """The indices of the first `num` examples of the stream `seed` that
    thinning keeps: an example of n shapes is kept with probability
    w[n-1] / max(w), by a draw of its own (generator [seed, index, 1]), so a
    corpus can hold more of the scenes a model finds hard while each example
    stays the stream's own (`generate_example(seed, index)`). Equal weights
    keep every index."""
    w = _check_count_weights(shape_count_weights)
    kept, index = 0, 0
    while kept < num:
        n = len(_sample_scene(np.random.default_rng([int(seed), index]))[0])
        if w[n - 1] >= 1.0 or np.random.default_rng([int(seed), index, 1]).random() < w[n - 1]:
            yield index
            kept += 1
        index += 1


def write_corpus(out_dir: str, seed: int, num: int, resolution: int = 64, progress: bool = False,
                 desc: str = "corpus", shape_count_weights: Optional[Sequence[float]] = None) -> str:
    """Write `num` examples as `out_dir/00000.png`, ... plus `out_dir/captions.jsonl`
    (one `{"file": "00000.png", "caption": "..."}` per line): the image-folder
    layout the data pipeline reads. Returns the path of captions.jsonl, which
    is written last (under a temporary name until complete). With
    `shape_count_weights`, the examples are the stream's thinned by their
    number of shapes (`kept_indices`); without, the first `num`."""
    import sys

    from PIL import Image
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(num - 1)))
    path = os.path.join(out_dir, "captions.jsonl")
    with open(path + ".tmp", "w") as f:
        examples = (generate(seed, num, resolution) if shape_count_weights is None else
                    (generate_example(seed, k, resolution) for k in kept_indices(seed, num, shape_count_weights)))
        for i, ex in enumerate(tqdm(examples, total=num, desc=desc, unit="img",
                                    file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=2)):
            name = f"{i:0{width}d}.png"
            Image.fromarray(ex.image).save(os.path.join(out_dir, name), compress_level=1)  # lossless; fast
            f.write(json.dumps({"file": name, "caption": ex.caption}) + "\n")
    os.replace(path + ".tmp", path)
    return path
