"""Drawing a shapes scene: numpy point-in-shape tests at pixel centres (no
antialiasing, no font, no PIL drawing), so one scene gives the same bytes at a
resolution every time. What the kinds look like is `data/shapes_grammar.py`'s."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3leon_jax.data.shapes_grammar import BACKGROUND, COLORS, KINDS, STAR_INNER_RATIO, ShapeSpec


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
