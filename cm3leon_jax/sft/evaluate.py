"""Scoring a fine-tuned model on held-out shapes instruction examples.

`evaluate(model_dir, data_dir)` runs every family's validation records of a
prepared shapes instruction corpus (sft/shapes_instructions.py) through the model
(sft/infer.py) and scores the outputs against the exact ground truth the
records carry:

    vqa         exact match of the answer (lower-cased, whitespace
                collapsed), overall and per question type
    captioning  checker facts: `data.shapes_check.score(true image, generated
                caption)`'s share of true facts (count, colours, kinds,
                sizes, positions, relations), a caption that does not parse
                scoring 0; and the share of captions with every fact true
    detection   mean IoU over the true boxes of the matched predicted box
                (same label, Hungarian; 0 when unmatched), and the share of
                true boxes found at IoU >= 0.5
    editing     the checker reads the edited image: the instructed change is
                found (recolour: the shape nearest the target's place has
                the new colour; remove: no shape is left there) and every
                untouched shape is preserved (a shape near its place with
                its colour and kind), with the shape count right. Success =
                both. The same score of the VQ-GAN reconstruction of the
                true output is reported beside it (the tokenizer's ceiling).
    grounded,   checker accuracy of the generated image against the scene's
    spatial     caption (all facts, and the share of facts)

Text outputs are decoded greedily; images with top-p and guidance (two-scale
where there is an input image), the settings given.
"""
from __future__ import annotations

import collections
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from cm3leon_jax.data import shapes
from cm3leon_jax.sft import shapes_instructions as instructions
from cm3leon_jax.sft import format as fmt

NEAR = 0.1  # image fractions: a detection this close to a shape's centre is "at its place"
TEXT_TOKENS = {fmt.VQA: 8, fmt.CAPTIONING: 48, fmt.DETECTION: 64}


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def vqa_scores(predictions: Sequence[str], metas: Sequence[dict]) -> dict:
    hits = collections.defaultdict(list)
    for p, m in zip(predictions, metas):
        ok = normalize_answer(p) == normalize_answer(m["answer"])
        hits["all"].append(ok)
        hits[m["type"]].append(ok)
    return {"exact_match": float(np.mean(hits["all"])) if hits["all"] else 0.0,
            "by_type": {t: float(np.mean(v)) for t, v in sorted(hits.items()) if t != "all"},
            "count": len(predictions)}


def _scene(meta: dict, resolution: int):
    return shapes.generate_example(meta["seed"], meta["index"], resolution)


def caption_scores(predictions: Sequence[str], metas: Sequence[dict], resolution: int) -> dict:
    from cm3leon_jax.data import shapes_check

    fractions, alls, unparsed = [], [], 0
    for p, m in zip(predictions, metas):
        try:
            facts = shapes.caption_facts(p)
        except ValueError:
            unparsed += 1
            fractions.append(0.0)
            alls.append(False)
            continue
        r = shapes_check.score(_scene(m, resolution).image, facts)
        fractions.append(r["fraction_correct"])
        alls.append(r["all_correct"])
    return {"facts": float(np.mean(fractions)) if fractions else 0.0,
            "all_correct": float(np.mean(alls)) if alls else 0.0, "unparsed": unparsed,
            "count": len(predictions)}


def detection_scores(predictions: Sequence[str], metas: Sequence[dict]) -> dict:
    ious = []
    for p, m in zip(predictions, metas):
        truth = [fmt.Box(**b) for b in m["boxes"]]
        ious += fmt.matched_iou(truth, fmt.text_to_boxes(p))
    ious = np.asarray(ious)
    return {"mean_iou": float(ious.mean()) if ious.size else 0.0,
            "recall_at_0.5": float((ious >= 0.5).mean()) if ious.size else 0.0, "boxes": int(ious.size),
            "count": len(predictions)}


def edit_check(image: np.ndarray, meta: dict, resolution: int) -> dict:
    """{"change", "preserved", "success"} of one edited image (module docstring)."""
    from scipy.optimize import linear_sum_assignment

    from cm3leon_jax.data import shapes_check

    before = list(_scene(meta, resolution).shapes)
    after = instructions.edit_scene(before, meta["op"], meta["target"], meta.get("new_color"))
    found = shapes_check.extract_facts(image)
    # Each expected shape of the edited scene to the nearest detection (one-to-one).
    match: Dict[int, Optional[object]] = {i: None for i in range(len(after))}
    if found and after:
        d = np.array([[np.hypot(s.center[0] - f.center[0], s.center[1] - f.center[1]) for f in found]
                      for s in after])
        for r, c in zip(*linear_sum_assignment(d)):
            if d[r, c] <= NEAR:
                match[r] = found[c]
    target = before[meta["target"]]
    if meta["op"] == "recolour":
        t = match[meta["target"]]
        change = t is not None and t.color == meta["new_color"]
        untouched = [i for i in range(len(after)) if i != meta["target"]]
    else:
        change = not any(np.hypot(target.center[0] - f.center[0], target.center[1] - f.center[1]) <= NEAR / 2
                         for f in found)
        untouched = list(range(len(after)))
    preserved = len(found) == len(after) and all(
        match[i] is not None and match[i].color == after[i].color and match[i].kind == after[i].kind
        for i in untouched)
    return {"change": bool(change), "preserved": bool(preserved), "success": bool(change and preserved)}


def edit_scores(images: np.ndarray, metas: Sequence[dict], resolution: int) -> dict:
    rows = [edit_check(img, m, resolution) for img, m in zip(images, metas)]
    out = {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in ("change", "preserved", "success")}
    by_op = collections.defaultdict(list)
    for r, m in zip(rows, metas):
        by_op[m["op"]].append(r["success"])
    return dict(out, by_op={k: float(np.mean(v)) for k, v in sorted(by_op.items())}, count=len(rows))


def image_caption_scores(images: np.ndarray, metas: Sequence[dict]) -> dict:
    from cm3leon_jax.data import shapes_check

    rs = [shapes_check.score(img, m["caption"]) for img, m in zip(images, metas)]
    return {"accuracy": float(np.mean([r["all_correct"] for r in rs])) if rs else 0.0,
            "facts": float(np.mean([r["fraction_correct"] for r in rs])) if rs else 0.0, "count": len(rs)}


def load_generator(model_dir: str, data_dir: str, vqgan_dir: Optional[str] = None,
                   text_tokenizer: Optional[str] = None):
    """The sampler for a fine-tuned model dir, with the tokenizers the SFT
    data dir was prepared with (its manifest) unless others are given."""
    from cm3leon_jax.sampling import generate as gen_lib
    from cm3leon_jax.sft import records as rec_lib

    models = rec_lib.read_manifest(data_dir).get("models", {})
    return gen_lib.Generator(gen_lib.load_model(model_dir, vqgan_dir or models.get("vqgan_dir"),
                                                text_tokenizer or models.get("text_tokenizer")))


def text_outputs(g, examples: Sequence[dict], family: str, *, seed: int = 0, batch_rows: int = 64) -> List[str]:
    """The model's greedy text output for each record of a text family
    (VQA, captioning, detection), decoded to a string."""
    from cm3leon_jax.sampling.sampler import SamplingSettings
    from cm3leon_jax.sft import infer

    ids = infer.complete(g, [(e["instruction"], e["input"]) for e in examples], output="text",
                         settings=SamplingSettings("greedy"), seed=seed, batch_rows=batch_rows,
                         max_text_tokens=TEXT_TOKENS[family])
    return [g.text.decode(i, skip_non_text=True) for i in ids]


def evaluate(model_dir: str, data_dir: str, *, families: Sequence[str] = tuple(fmt.FAMILIES),
             limit: Optional[int] = None, settings=None, seed: int = 0, batch_rows: int = 64,
             vqgan_dir: Optional[str] = None, text_tokenizer: Optional[str] = None, progress: bool = True) -> dict:
    """Scores per family (module docstring); `settings` are the image
    decoding's (default top-p 0.9, CFG 3, image scale 1.5)."""
    import sys
    import time

    from cm3leon_jax.sampling.sampler import SamplingSettings
    from cm3leon_jax.sft import infer
    from cm3leon_jax.sft import records as rec_lib

    g = load_generator(model_dir, data_dir, vqgan_dir, text_tokenizer)
    bundle = g.b
    res = g.vq.resolution
    image_settings = settings or SamplingSettings("top_p", top_p=0.9, cfg_scale=3.0, image_cfg_scale=1.5)
    report = {"model_dir": bundle.model_dir, "step": bundle.step, "data_dir": data_dir,
              "image_settings": {k: getattr(image_settings, k) for k in ("decoding", "top_p", "temperature",
                                                                          "cfg_scale", "image_cfg_scale")}}
    for family in families:
        t0 = time.time()
        exs = rec_lib.read_examples(data_dir, family, "validation", limit)
        if not exs:
            report[family] = {"count": 0, "note": "no validation records"}
            continue
        metas = [e["meta"] for e in exs]
        if fmt.FAMILIES[family][1] == "text":
            texts = text_outputs(g, exs, family, seed=seed, batch_rows=batch_rows)
            if family == fmt.VQA:
                r = vqa_scores(texts, metas)
            elif family == fmt.CAPTIONING:
                r = caption_scores(texts, metas, res)
            else:
                r = detection_scores(texts, metas)
            r["examples"] = [{"id": e["id"], "output": t} for e, t in zip(exs[:5], texts[:5])]
        else:
            codes = infer.complete(g, [(e["instruction"], e["input"]) for e in exs], output="image",
                                   settings=image_settings, seed=seed, batch_rows=batch_rows)
            images = g.vq.decode(np.stack(codes))
            truth = g.vq.decode(np.stack([bundle.vocab.id_to_image_code(e["output"]) for e in exs]))
            if family == fmt.EDITING:
                r = edit_scores(images, metas, res)
                r["tokenizer_ceiling"] = edit_scores(truth, metas, res)["success"]
            else:
                r = image_caption_scores(images, metas)
                r["tokenizer_ceiling"] = image_caption_scores(truth, metas)["accuracy"]
        r["seconds"] = round(time.time() - t0, 1)
        report[family] = r
        if progress:
            print(f"sft eval {family}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in r.items() if not isinstance(v, (dict, list))),
                  file=sys.stderr, flush=True)
    return report
