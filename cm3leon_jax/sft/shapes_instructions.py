"""The shapes instruction corpus: every SFT task family built from the
procedural shapes scenes (data/shapes.py) with exact ground truth, so a
fine-tuned model is scored by the analytic checker and by exact match.

Families (sft/format.py) and their instructions:

    captioning  "describe the image"                      image -> the caption
    vqa         one question with a unique answer          image -> a word:
                "what colour is the square?"          (the kind is unique)
                "what shape is the red one?"          (the colour is unique)
                "how many shapes are there?"          one / two / three
                "is the red square small or large?"   small / large
                "where is the red square?"            a 3x3 cell name, e.g.
                                                      "top left" (asked when
                                                      the centre is >= 0.03
                                                      from every cell border)
    detection   "detect the shapes"                        image -> boxes as text,
                                                      "red circle 3 10 12 19, ..."
    editing     "make the red circle blue"            (recolour) or
                "remove the red circle"               (scenes of 2-3 shapes)
                                                           image -> edited image
    grounded    "edges to image: <caption>"                edge map -> image
    spatial     "draw: red circle 3 10 12 19, ..."         text with boxes -> image

Assumptions (the paper's SFT data are real datasets; these are ours):
- one fixed instruction template per family (or per question type): the
  task is told by the instruction, not by a template drawn from many;
- labels of boxes and targets of edits are "colour kind", unique in the
  scene (scenes where they are not are skipped for that family);
- a box is the bounding box of the shape's rendered pixels;
- the edge map is the shapes' 1-pixel inner outlines in black on white;
- streams: family k's training scenes are shapes stream 1000 + k, its
  held-out scenes stream 2000 + k (disjoint from the pretraining corpus,
  stream 0, and its held-out captions, stream 777).

`records(family, split, num)` yields instruction records (sft/records.py)
with the images as arrays and the ground truth in "meta": the scene's
(seed, index) and per family the answer, boxes or edit.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from cm3leon_jax.data import shapes
from cm3leon_jax.sft import format as fmt

TRAIN_STREAM, HELDOUT_STREAM = 1000, 2000
CAPTION_INSTRUCTION = "describe the image"
DETECT_INSTRUCTION = "detect the shapes"
GROUNDED_PREFIX = "edges to image: "
SPATIAL_PREFIX = "draw: "
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
WHERE_MARGIN = 0.03
QUESTION_TYPES = ("color", "kind", "count", "size", "where")


def stream(family: str, split: str) -> int:
    k = list(fmt.FAMILIES).index(fmt.check_family(family))
    if split not in ("train", "validation"):
        raise ValueError(f"split must be train or validation, got {split!r}")
    return (TRAIN_STREAM if split == "train" else HELDOUT_STREAM) + k


def label(spec: shapes.ShapeSpec) -> str:
    return f"{spec.color} {spec.kind}"


def _unique_labels(specs: Sequence[shapes.ShapeSpec]) -> bool:
    labels = [label(s) for s in specs]
    return len(set(labels)) == len(labels)


def box_of(spec: shapes.ShapeSpec, resolution: int) -> fmt.Box:
    """The bounding box of the shape's rendered pixels, as image fractions."""
    rows, cols = np.nonzero(shapes.shape_mask(spec, resolution))
    return fmt.Box(label(spec), cols.min() / resolution, rows.min() / resolution,
                   (cols.max() + 1) / resolution, (rows.max() + 1) / resolution)


def edge_map(specs: Sequence[shapes.ShapeSpec], resolution: int) -> np.ndarray:
    """Black 1-pixel inner outlines of the shapes on white (uint8 [R, R, 3])."""
    from scipy import ndimage

    out = np.full((resolution, resolution, 3), 255, np.uint8)
    for spec in specs:
        m = shapes.shape_mask(spec, resolution)
        out[m & ~ndimage.binary_erosion(m)] = 0
    return out


# ------------------------------------------------------------------------------- VQA


def questions(ex: shapes.ShapesExample) -> List[dict]:
    """Every question with a unique answer about a scene: {"type", "question", "answer"}."""
    specs = ex.shapes
    kinds = [s.kind for s in specs]
    colors = [s.color for s in specs]
    out = [{"type": "count", "question": "how many shapes are there?", "answer": COUNT_WORDS[len(specs)]}]
    for s in specs:
        if kinds.count(s.kind) == 1:
            out.append({"type": "color", "question": f"what colour is the {s.kind}?", "answer": s.color})
        if colors.count(s.color) == 1:
            out.append({"type": "kind", "question": f"what shape is the {s.color} one?", "answer": s.kind})
        if [label(t) for t in specs].count(label(s)) == 1:
            out.append({"type": "size", "question": f"is the {label(s)} small or large?", "answer": s.size})
            x, y = s.center
            if all(min(abs(v * 3 - round(v * 3)), 1.0) / 3 >= WHERE_MARGIN for v in (x, y)):
                out.append({"type": "where", "question": f"where is the {label(s)}?", "answer": s.position})
    return out


# ------------------------------------------------------------------------------- editing


def edit_scene(specs: Sequence[shapes.ShapeSpec], op: str, target: int, new_color: Optional[str] = None):
    """The scene after an edit: recolour shape `target` or remove it."""
    specs = list(specs)
    if op == "recolour":
        specs[target] = dataclasses.replace(specs[target], color=new_color)
    elif op == "remove":
        del specs[target]
    else:
        raise ValueError(f"unknown edit {op!r}; edits are recolour and remove")
    return specs


def edit_instruction(spec: shapes.ShapeSpec, op: str, new_color: Optional[str] = None) -> str:
    return f"make the {label(spec)} {new_color}" if op == "recolour" else f"remove the {label(spec)}"


# ------------------------------------------------------------------------------- records


def record(family: str, seed: int, index: int, resolution: int = 64) -> Optional[dict]:
    """The instruction record of scene (seed, index) for a family, or None
    when the scene does not suit it (module docstring). The family's choices
    (question, edit) are drawn from the scene's own seeded generator."""
    ex = shapes.generate_example(seed, index, resolution)
    rng = np.random.default_rng([seed, index, 7])
    meta = {"seed": int(seed), "index": int(index), "caption": ex.caption}
    rid = f"shapes-{family}-{seed}-{index}"
    base = {"id": rid, "task": family, "input_image": None, "output_image": None, "output_text": None}
    if family == fmt.CAPTIONING:
        return dict(base, instruction=CAPTION_INSTRUCTION, input_image=ex.image, output_text=ex.caption, meta=meta)
    if family == fmt.VQA:
        qs = questions(ex)
        by_type: Dict[str, list] = {}
        for q in qs:
            by_type.setdefault(q["type"], []).append(q)
        types = sorted(by_type)
        q = by_type[types[rng.integers(len(types))]]
        q = q[rng.integers(len(q))]
        return dict(base, instruction=q["question"], input_image=ex.image, output_text=q["answer"],
                    meta=dict(meta, type=q["type"], answer=q["answer"]))
    if not _unique_labels(ex.shapes):
        return None
    boxes = [box_of(s, resolution) for s in ex.shapes]
    box_meta = [dataclasses.asdict(b) for b in boxes]
    if family == fmt.DETECTION:
        return dict(base, instruction=DETECT_INSTRUCTION, input_image=ex.image,
                    output_text=fmt.boxes_to_text(boxes), meta=dict(meta, boxes=box_meta))
    if family == fmt.SPATIAL:
        return dict(base, instruction=SPATIAL_PREFIX + fmt.boxes_to_text(boxes), output_image=ex.image,
                    meta=dict(meta, boxes=box_meta))
    if family == fmt.GROUNDED:
        return dict(base, instruction=GROUNDED_PREFIX + ex.caption, input_image=edge_map(ex.shapes, resolution),
                    output_image=ex.image, meta=meta)
    if family == fmt.EDITING:
        ops = ["recolour"] + (["remove"] if len(ex.shapes) > 1 else [])
        op = ops[rng.integers(len(ops))]
        target = int(rng.integers(len(ex.shapes)))
        spec = ex.shapes[target]
        new_color = None
        if op == "recolour":
            others = [c for c in shapes.COLORS if c != spec.color]
            new_color = others[rng.integers(len(others))]
        after = edit_scene(ex.shapes, op, target, new_color)
        if not _unique_labels(after):
            return None
        return dict(base, instruction=edit_instruction(spec, op, new_color), input_image=ex.image,
                    output_image=shapes.render(after, resolution),
                    meta=dict(meta, op=op, target=target, new_color=new_color))
    raise ValueError(f"unknown SFT task family {family!r}")


def records(family: str, split: str, num: int, resolution: int = 64) -> Iterator[dict]:
    """`num` records of a family and split (unsuitable scenes are passed over)."""
    seed, index, n = stream(family, split), 0, 0
    while n < num:
        r = record(family, seed, index, resolution)
        index += 1
        if r is not None:
            n += 1
            yield r


def build(out_dir: str, vqgan_dir: str, text_tokenizer: str, *, train_per_family: int = 8000,
          heldout_per_family: int = 200, families: Sequence[str] = tuple(fmt.FAMILIES),
          max_inputs_length: int = 128, max_targets_length: int = 128, progress: bool = True) -> dict:
    """The shapes instruction corpus, prepared (sft/records.py) into
    `out_dir`: train and validation splits of every family."""
    import itertools

    from cm3leon_jax.models.image_tokenizer import ImageTokenizer
    from cm3leon_jax.sft import records as rec_lib

    resolution = ImageTokenizer.from_model_dir(vqgan_dir).resolution
    report = {}
    for split, num in (("train", train_per_family), ("validation", heldout_per_family)):
        recs = itertools.chain.from_iterable(records(f, split, num, resolution) for f in families)
        report[split] = rec_lib.prepare_sft(recs, out_dir, vqgan_dir, text_tokenizer, split=split,
                                            max_inputs_length=max_inputs_length,
                                            max_targets_length=max_targets_length, progress=progress)
    return report
