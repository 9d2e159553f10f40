"""Shapes-checker results summed up by kind of fact and by number of shapes.

`shapes_check.score` says, for one image and its caption, which stated
facts hold ("shape0.kind", "shape1.color", "relation0", "count", ...).
`Breakdown` collects many such results and reports:

- accuracy: the share of images whose every fact holds (whole caption);
- fraction_of_facts: the mean share of facts that hold per image;
- facts: per kind of fact, the share of stated facts of that kind that hold
  over all images (kind, color, size, position: per stated shape; relation:
  per stated relation; count: per image);
- by_shapes: whole-caption accuracy of the images whose caption names 1, 2
  or 3 shapes, with how many images each group holds.

The same summary serves `cm3leon eval shapes`, the demo report and
benchmarks/time_to_quality.py, so their numbers mean the same thing.
`tokenizer_ceiling` gives it for the VQ-GAN reconstructions of real images:
what a decoder that draws exactly the codes of the real image would score.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

FACT_TYPES = ("kind", "color", "size", "position", "relation", "count")


def fact_type(name: str) -> str:
    """"shape1.kind" -> "kind", "relation0" -> "relation", "count" -> "count"."""
    if name.startswith("relation"):
        return "relation"
    kind = name.split(".", 1)[1] if "." in name else name
    if kind not in FACT_TYPES:
        raise ValueError(f"unknown shapes-checker fact {name!r}")
    return kind


class Breakdown:
    """Accumulates `shapes_check.score` results (see the module docstring)."""

    def __init__(self):
        self.correct: List[float] = []
        self.fraction: List[float] = []
        self.per_type: Dict[str, List[float]] = {t: [] for t in FACT_TYPES}
        self.per_count: Dict[int, List[float]] = {}

    def add(self, result: dict) -> None:
        ok = float(result["all_correct"])
        self.correct.append(ok)
        self.fraction.append(float(result["fraction_correct"]))
        for name, holds in result["facts"].items():
            self.per_type[fact_type(name)].append(float(holds))
        self.per_count.setdefault(int(result["num_expected"]), []).append(ok)

    def __len__(self) -> int:
        return len(self.correct)

    def summary(self) -> dict:
        def mean(v):
            return float(np.mean(v)) if v else float("nan")

        return {"accuracy": mean(self.correct), "fraction_of_facts": mean(self.fraction),
                "facts": {t: mean(v) for t, v in self.per_type.items() if v},
                "by_shapes": {str(n): {"accuracy": mean(v), "images": len(v)}
                              for n, v in sorted(self.per_count.items())},
                "images": len(self.correct)}


def summarize(results) -> dict:
    """`Breakdown.summary()` of an iterable of `shapes_check.score` results."""
    b = Breakdown()
    for r in results:
        b.add(r)
    return b.summary()


def score_images(images, captions) -> dict:
    """`summarize` of the checker's scores of images [N, H, W, 3] against
    their captions."""
    from cm3leon_jax.data import shapes_check

    return summarize(shapes_check.score(im, c) for im, c in zip(images, captions))


def tokenizer_ceiling(vqgan_dir: str, image_folder: str, limit: int | None = None) -> dict:
    """`score_images` of the VQ-GAN reconstructions of an image folder's
    images (captions.jsonl: {"file", "caption"} per line), the first `limit`."""
    import json
    import os

    from cm3leon_jax.data.images import read_rgb
    from cm3leon_jax.models.image_tokenizer import ImageTokenizer, reconstruct

    with open(os.path.join(image_folder, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()][:limit]
    if not rows:
        raise ValueError(f"{image_folder!r}: captions.jsonl lists no images")
    images = np.stack([read_rgb(os.path.join(image_folder, r["file"])) for r in rows])
    return score_images(reconstruct(ImageTokenizer.from_model_dir(vqgan_dir), images), [r["caption"] for r in rows])
