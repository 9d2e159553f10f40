"""Analytic checker for the "shapes" corpus: read an image back into facts and
score it against a caption, with no pretrained model (DESIGN.md, "Embedded
default"). Built for blurry, slightly off-colour images (VQ-GAN
reconstructions, model samples) as much as for the crisp ground truth.

How an image becomes facts (`extract_facts`):

1. Pixels. A blurred edge is a mix of a shape's colour and the background, so
   each palette colour c defines a segment from the background b to c; a
   pixel p is projected on each segment (p ~ b + alpha (c - b)) and takes the
   colour with the smallest residual. It is foreground when that alpha >= 0.5
   (at least half-way to the colour), or when it is far from the background
   but matches no colour (then its colour is unknown: a wrongly coloured shape
   still counts as a shape).
2. Components. 8-connected components of the foreground (scipy.ndimage.label),
   holes filled; components smaller than `min_area` (a fraction of the image)
   are noise and dropped. A component that holds two colours in strength is
   two shapes that touch, and is split by colour, unless its outline is
   itself one shape: a blotchy or two-toned shape (a reconstruction or a
   sample can shade one shape from yellow into orange) is one shape, not
   two. "Is one shape" is read from the filled mask's scale-free moments
   (`_outline_misfit`): every kind's outline is within 7e-4 of its prototype
   (400 blurred renders, 13-26 pixels), every union of two touching shapes
   at least 3.5e-3 away (380 pairs), so `ONE_SHAPE_MISFIT` splits the gap.
3. Kind and size, from soft mass. Blur erodes a small star's points and
   rounds a square's corners, so thresholded-mask features (bounding-box fill,
   solidity) fail on reconstructions. Instead each pixel near a shape (within
   `REGION_REACH`, split between shapes by nearest shape) carries a soft mass
   alpha, its projection on the shape's colour direction, and the kind is read
   from the scale-free complex moments D_k = sum alpha z^k / m^(1 + k/2)
   (z = x + iy about the centroid, m = sum alpha). An isotropic Gaussian blur
   leaves both sum alpha z^k (k >= 1) and m unchanged, so D_k are blur-proof.
   Signatures: triangle (apex up) Im D3 > 0, square Re D4 < 0, diamond
   Re D4 > 0, star (point up) Im D5 < 0, circle none of them; the kind is the
   nearest prototype, measured on a sharp 256-pixel render of each kind. The
   extent is that of the shape of this kind with soft area m (blur-proof too),
   and its size class splits at `shapes.SIZE_THRESHOLD`.
4. Colour by majority vote of the shape's pixels; centre is the bounding-box
   centre of its foreground mask, as in the generator.

`score(image, caption)` matches the caption's shapes to the detected ones (the
assignment that makes the most facts true, all of them tried) and reports each
stated fact: the count, every shape's colour, kind, size and position (where
stated) and every relation, using the same definitions as the generator
(`shapes.relation_holds`, `shapes.grid_position`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional, Union

import numpy as np
from scipy import ndimage

from cm3leon_jax.data import shapes

_COLOR_NAMES = tuple(shapes.COLORS)
_BG = np.array(shapes.BACKGROUND, np.float32)
_DIRS = np.array([shapes.COLORS[c] for c in _COLOR_NAMES], np.float32) - _BG  # [C, 3]
_EIGHT = np.ones((3, 3), bool)

# Pixel classification: a pixel whose residual from its best colour segment is
# above MAX_RESIDUAL matches no colour; one that far from the background
# (UNKNOWN_DISTANCE, ~half the nearest colour's distance) is still foreground.
MAX_RESIDUAL = 90.0
UNKNOWN_DISTANCE = 120.0
# A second colour holding this share of a component makes it two shapes.
SPLIT_SHARE = 0.3
# ... unless the component's outline fits one kind this well (see step 2).
ONE_SHAPE_MISFIT = 1.5e-3
# Soft-mass region: background pixels up to this far (fraction of the image
# side, at least 3 pixels) from a shape count towards its moments, so a blurred
# shape's tails are weighed in; each pixel goes to its nearest shape.
REGION_REACH = 0.05


@dataclasses.dataclass(frozen=True)
class DetectedShape:
    """A shape read from pixels. `center` (x, y) is the bounding-box centre and
    `extent` the larger bounding-box side of the shape that has this kind and
    soft area, both fractions of the image side as in `shapes.ShapeSpec`;
    `color` is None when the pixels match no palette colour. `moments` are the
    scale-free complex moments (Im D3, Re D4, Im D5) the kind was read from."""
    kind: str
    color: Optional[str]
    size: str
    center: tuple
    extent: float
    area: float  # soft area, pixels
    moments: tuple

    @property
    def position(self) -> str:
        return shapes.grid_position(*self.center)


def classify_pixels(image: np.ndarray):
    """Per pixel: colour index into `shapes.COLORS` (-1 for none) and a
    foreground mask. image: uint8 or float in [0, 255], [H, W, 3]."""
    d = np.asarray(image, np.float32)[..., :3] - _BG  # [H, W, 3]
    alpha = np.clip(d @ _DIRS.T / (_DIRS * _DIRS).sum(-1), 0.0, 1.0)  # [H, W, C]
    residual = np.linalg.norm(d[..., None, :] - alpha[..., None] * _DIRS, axis=-1)
    best = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    matched = best_residual <= MAX_RESIDUAL
    far = np.linalg.norm(d, axis=-1) >= UNKNOWN_DISTANCE
    foreground = (matched & (best_alpha >= 0.5)) | (~matched & far)
    return np.where(matched, best, -1), foreground


def _soft_moments(alpha: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """Soft area m and the scale-free complex moments D_k = sum a z^k / m^(1+k/2)
    (z = x + iy about the centroid, y down) for k = 3, 4, 5.

    The numerators are unchanged by an isotropic Gaussian blur (its own
    moments E[z^k] vanish for k >= 1) and m is the conserved mass, so D_k of a
    blurred shape equals D_k of the sharp one: blur-proof kind features. Each
    kind has a signature: a triangle (apex up) Im D3 > 0, a square Re D4 < 0,
    a diamond Re D4 > 0, a star (point up) Im D5 < 0, a circle none."""
    m = float(alpha.sum())
    x, y = cols + 0.5, rows + 0.5
    z = (x - (alpha * x).sum() / m) + 1j * (y - (alpha * y).sum() / m)
    d3, d4, d5 = ((alpha * z ** k).sum() / m ** (1 + k / 2) for k in (3, 4, 5))
    return m, (float(d3.imag), float(d4.real), float(d5.imag))


@functools.lru_cache(maxsize=None)
def _calibration():
    """Per kind: the moments and soft area / extent^2 of a large, sharp render
    (256 pixels, extent 0.5): the prototypes kinds are matched against."""
    out = {}
    for kind in shapes.KINDS:
        spec = shapes.ShapeSpec(kind, "red", "large", (0.5, 0.5), 0.5)
        mask = shapes.shape_mask(spec, 256)
        rows, cols = np.nonzero(mask)
        m, feats = _soft_moments(np.ones(rows.shape), rows, cols)
        out[kind] = (np.array(feats), m / (0.5 * 256) ** 2)
    return out


def _kind(moments) -> str:
    cal = _calibration()
    return min(shapes.KINDS, key=lambda k: np.sum((np.array(moments) - cal[k][0]) ** 2))


def _mask_moments(mask: np.ndarray) -> np.ndarray:
    """Scale-free moments of a binary mask: (Re D2, Im D2, Im D3, Re D4, Im D5),
    D_k = sum z^k / m^(1 + k/2) about the centroid. D2 (elongation) is not
    among the kind features but tells a pair of shapes from one."""
    rows, cols = np.nonzero(mask)
    z = (cols - cols.mean()) + 1j * (rows - rows.mean())
    m = float(len(rows))
    d = [(z ** k).sum() / m ** (1 + k / 2) for k in (2, 3, 4, 5)]
    return np.array([d[0].real, d[0].imag, d[1].imag, d[2].real, d[3].imag])


@functools.lru_cache(maxsize=None)
def _outline_prototypes():
    return [_mask_moments(shapes.shape_mask(shapes.ShapeSpec(kind, "red", "large", (0.5, 0.5), 0.5), 256))
            for kind in shapes.KINDS]


def _outline_misfit(mask: np.ndarray) -> float:
    """Squared distance of the mask's moments to the nearest kind's."""
    f = _mask_moments(mask)
    return float(min(np.sum((f - p) ** 2) for p in _outline_prototypes()))


def _pieces(image: np.ndarray, min_pixels: int):
    """Foreground components (8-connected, holes filled, small ones dropped),
    split by colour where two colours are strong: a list of (mask, colour index)."""
    color_index, foreground = classify_pixels(image)
    labels, _ = ndimage.label(foreground, structure=_EIGHT)
    pieces = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[sl] == k
        if component.sum() < min_pixels:
            continue
        colors = color_index[sl][component]
        counts = np.bincount(colors + 1, minlength=len(_COLOR_NAMES) + 1)  # [unknown, c...]
        strong = [c for c in np.argsort(-counts[1:]) if counts[c + 1] >= SPLIT_SHARE * colors.size]
        parts = []
        if len(strong) > 1 and _outline_misfit(ndimage.binary_fill_holes(component)) > ONE_SHAPE_MISFIT:
            # shapes that touch: one piece per strong colour
            for c in strong:
                sub, n_sub = ndimage.label(component & (color_index[sl] == c), structure=_EIGHT)
                parts += [(sub == j, int(c)) for j in range(1, n_sub + 1)]
        else:  # a palette colour wins unless unknown pixels outnumber it 2:1
            c = int(counts[1:].argmax())
            parts = [(component, c if counts[c + 1] >= 0.5 * counts[0] else -1)]
        for part, c in parts:
            if part.sum() >= min_pixels:
                full = np.zeros(foreground.shape, bool)
                full[sl] = ndimage.binary_fill_holes(part)
                pieces.append((full, c))
    return pieces


def extract_facts(image: np.ndarray, min_area: float = 0.003) -> list:
    """The shapes in `image` (a square uint8 [H, W, 3]) as `DetectedShape`s,
    largest first. Components under `min_area` x H x W pixels are noise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] < 3:
        raise ValueError(f"expected a square [H, W, 3] image, got shape {image.shape}")
    resolution = image.shape[0]
    pieces = _pieces(image, max(1, int(round(min_area * resolution * resolution))))
    if not pieces:
        return []
    owner = np.zeros(image.shape[:2], np.int32)
    for k, (mask, _) in enumerate(pieces, start=1):
        owner[mask] = k
    # Each pixel within reach goes to the nearest piece (a Voronoi split).
    dist, (ii, jj) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest = np.where(dist <= max(3.0, REGION_REACH * resolution), owner[ii, jj], 0)
    # Moments are taken against the image's own background (a sample's may be
    # off-white), else a uniform offset would add mass over the whole region.
    background = np.median(image[..., :3][nearest == 0], axis=0) if (nearest == 0).any() else _BG
    d = image[..., :3].astype(np.float32) - background.astype(np.float32)
    found = []
    for k, (mask, c) in enumerate(pieces, start=1):
        if c >= 0:
            direction = _DIRS[c] + _BG - background
        else:  # no palette colour: the piece's own strongest half
            inside = d[mask]
            strength = np.linalg.norm(inside, axis=-1)
            direction = inside[strength >= np.median(strength)].mean(0)
        rows, cols = np.nonzero(nearest == k)
        alpha = d[rows, cols] @ direction / float(direction @ direction)
        if not float(alpha.sum()) > 0:  # no soft mass to normalise by: the binary mask's moments
            alpha, (rows, cols) = np.ones(int(mask.sum())), np.nonzero(mask)
        m, moments = _soft_moments(alpha, rows, cols)
        kind = _kind(moments)
        extent = np.sqrt(m / _calibration()[kind][1]) / resolution
        mr, mc = np.nonzero(mask)
        center = (float(mc.min() + mc.max() + 1) / 2 / resolution,
                  float(mr.min() + mr.max() + 1) / 2 / resolution)
        found.append(DetectedShape(kind, _COLOR_NAMES[c] if c >= 0 else None,
                                   shapes.size_class(extent), center, float(extent), m, moments))
    return sorted(found, key=lambda s: -s.area)


def _shape_checks(fact: "shapes.ShapeFact", det: Optional[DetectedShape]) -> dict:
    checks = {"color": det is not None and det.color == fact.color,
              "kind": det is not None and det.kind == fact.kind}
    if fact.size is not None:
        checks["size"] = det is not None and det.size == fact.size
    if fact.position is not None:
        checks["position"] = det is not None and det.position == fact.position
    return checks


def score(image: np.ndarray, caption: Union[str, "shapes.CaptionFacts"],
          max_candidates: int = 6) -> dict:
    """Score `image` against every fact `caption` states.

    Returns a dict:
      facts: {name: bool}: "count", "shape{i}.color", "shape{i}.kind",
        "shape{i}.size", "shape{i}.position" (where stated) and
        "relation{j}" (caption shape order, i from 0);
      all_correct: every fact true; fraction_correct: the share that are;
      num_expected, num_detected; detected: the `DetectedShape`s;
      assignment: per caption shape, the index into `detected` or None.
    Caption shapes are matched to the `max_candidates` largest detections by
    the assignment that makes the most facts true.
    """
    facts = shapes.caption_facts(caption) if isinstance(caption, str) else caption
    detected = extract_facts(image)
    n, candidates = len(facts.shapes), list(range(min(len(detected), max_candidates)))
    pool = candidates + [None] * max(0, n - len(candidates))
    best, best_true = None, -1
    for perm in dict.fromkeys(itertools.permutations(pool, n)):
        result = {}
        for i, (fact, d) in enumerate(zip(facts.shapes, perm)):
            det = detected[d] if d is not None else None
            for name, ok in _shape_checks(fact, det).items():
                result[f"shape{i}.{name}"] = ok
        for j, r in enumerate(facts.relations):
            a, b = perm[r.subject], perm[r.object]
            result[f"relation{j}"] = bool(a is not None and b is not None and shapes.relation_holds(
                r.relation, detected[a].center, detected[b].center))
        num_true = sum(result.values())
        if num_true > best_true:
            best, best_true, best_result = perm, num_true, result
    result = {"count": len(detected) == n, **best_result}
    return {
        "all_correct": all(result.values()),
        "fraction_correct": sum(result.values()) / len(result),
        "facts": result,
        "num_expected": n,
        "num_detected": len(detected),
        "detected": detected,
        "assignment": best,
    }
