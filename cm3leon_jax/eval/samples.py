"""Scores for a `cm3leon generate` output dir (its samples.json and PNGs):

- `shapes_accuracy`: the analytic shapes checker (data/shapes_check.py) on
  every sample against its prompt: the share of samples whose every stated
  fact holds ("accuracy"), the mean share of facts that hold, the same for
  the top-ranked sample of each prompt (CLIP rerank: best of N), the same
  for sample 0 alone (what one sample per prompt gives), a breakdown by
  decoding (`mixed` writes one CD-K sample per prompt, the rest top-p), and per kind of fact
  and per number of shapes (eval/shapes_breakdown.py) over all samples,
  the top-ranked ones and sample 0.
- `clip_score`: the mean cosine similarity between the CLIP embeddings of
  each sample and its prompt (both L2-normalised), over all samples and over
  the top-ranked ones.

Prompts that are not shapes captions cannot be checked: `shapes_accuracy`
counts them as skipped instead of failing.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from cm3leon_jax.data.images import read_rgb as load_image

SAMPLES_FILE = "samples.json"


def read_samples(out_dir: str) -> List[dict]:
    """One row per written sample: prompt, file (absolute), rank (by CLIP
    score), sample (its index in the batch: sample 0 is what
    `--num_samples=1` gives with the same seed), decoding."""
    path = os.path.join(out_dir, SAMPLES_FILE) if os.path.isdir(out_dir) else out_dir
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} has no {SAMPLES_FILE}: point --samples at a `cm3leon generate --out` dir")
    with open(path) as f:
        report = json.load(f)
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for p in report.get("prompts", []):
        for s in p.get("samples", []):
            rows.append({"prompt": p["prompt"], "file": os.path.join(base, s["file"]), "rank": int(s["rank"]),
                         "sample": int(s.get("sample", s["rank"])), "decoding": s.get("decoding")})
    if not rows:
        raise ValueError(f"{path!r} lists no samples")
    missing = [r["file"] for r in rows if not os.path.isfile(r["file"])]
    if missing:
        raise ValueError(f"{len(missing)} sample file(s) listed in {path!r} are missing, e.g. {missing[0]!r}")
    return rows


def sample_files(out_dir: str, which: str = "all") -> List[str]:
    """The image files of a generate dir: "all", each prompt's "top_ranked"
    one (best by CLIP score) or its "first_sample" (sample 0)."""
    keep = {"all": lambda r: True, "top_ranked": lambda r: r["rank"] == 0,
            "first_sample": lambda r: r["sample"] == 0}
    if which not in keep:
        raise ValueError(f"which must be one of {sorted(keep)}, got {which!r}")
    return [r["file"] for r in read_samples(out_dir) if keep[which](r)]


def _summary(values: List[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def shapes_accuracy(out_dir: str) -> dict:
    from cm3leon_jax.data import shapes
    from cm3leon_jax.data import shapes_check
    from cm3leon_jax.eval import shapes_breakdown

    rows = read_samples(out_dir)
    every, top, first = (shapes_breakdown.Breakdown() for _ in range(3))
    by_decoding: Dict[str, List[float]] = {}
    skipped = 0
    for r in rows:
        try:
            facts = shapes.caption_facts(r["prompt"])
        except ValueError:  # not a shapes caption
            skipped += 1
            continue
        result = shapes_check.score(load_image(r["file"]), facts)
        every.add(result)
        if r["rank"] == 0:
            top.add(result)
        if r["sample"] == 0:
            first.add(result)
        by_decoding.setdefault(r["decoding"] or "unknown", []).append(float(result["all_correct"]))
    if not len(every):
        raise ValueError(f"no sample in {out_dir!r} has a shapes caption as its prompt ({skipped} skipped)")
    summary = every.summary()
    return {"accuracy": summary["accuracy"], "fraction_of_facts": summary["fraction_of_facts"],
            "top_ranked_accuracy": top.summary()["accuracy"], "first_sample_accuracy": first.summary()["accuracy"],
            "num_samples": len(every),
            "num_prompts": len(top), "skipped_non_shapes_prompts": skipped,
            "accuracy_by_decoding": {k: _summary(v) for k, v in sorted(by_decoding.items())},
            "facts": summary["facts"], "by_shapes": summary["by_shapes"],
            "top_ranked": top.summary(), "first_sample": first.summary()}


def clip_score(out_dir: str, clip_dir: str, batch_size: int = 64, encoder=None) -> dict:
    """`encoder`: an already loaded `ClipEncoder` of `clip_dir` (saves the load)."""
    from cm3leon_jax.retrieval.clip_encoder import ClipEncoder

    rows = read_samples(out_dir)
    enc = encoder or ClipEncoder(clip_dir, batch_size=batch_size)
    prompts = sorted({r["prompt"] for r in rows})
    text = dict(zip(prompts, enc.encode_texts(prompts)))
    images = enc.encode_images([load_image(r["file"]) for r in rows])
    sims = np.array([float(text[r["prompt"]] @ images[i]) for i, r in enumerate(rows)])
    top = np.array([r["rank"] == 0 for r in rows])
    return {"clip_score": float(sims.mean()), "top_ranked_clip_score": float(sims[top].mean()) if top.any()
            else float("nan"), "num_samples": len(rows), "num_prompts": int(top.sum())}
