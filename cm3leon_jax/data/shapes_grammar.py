"""The "shapes" corpus's grammar: its words, what they mean in pixels, and the
records of a scene (`ShapeSpec`, `Relation`, `ShapesExample`) and of what a
caption states (`ShapeFact`, `CaptionFacts`). The corpus itself (a seeded
stream of scenes) is `data/shapes.py`; drawing is `data/shapes_render.py`,
captions `data/shapes_caption.py`, the image-folder writer
`data/shapes_corpus.py`.

Each example is one to three flat-coloured shapes on a white background with a
caption that states facts an analytic checker (`cm3leon_jax.data.shapes_check`)
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
"""
from __future__ import annotations

import dataclasses
from typing import Optional

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
