"""The shapes CLIP's training data (train/clip_trainer.py): scenes of the
shapes corpus with one-edit hard-negative siblings, and the batches.

The trainer (`train_clip`) renders a fixed training set once at start from
the shapes stream `data_seed` (rendering on the fly would cost about as much
as a train step on a 2-core CPU): S scenes and, for each, one-edit "siblings"
(`sibling_scene`: the same scene with a shape moved or the layout flipped,
or with one kind changed, ...). A batch is B/2 pairs of a scene and one of
its siblings, so every example meets a hard negative that differs from it in
one stated fact; random batches almost never do, and a CLIP trained on them
learns colours and sizes but not where shapes are (benchmarks/RESULTS.md,
"CLIP on shapes"). Batches are a pure function of the step (resuming needs
nothing but the step), and each pair is mirrored left-right with probability
`mirror_prob`: every shape kind is left-right symmetric, so the mirrored
image is exactly the render of the mirrored scene, whose caption swaps
"left" and "right" (`mirror_caption`). Held-out evaluation uses another
stream (`eval_seed`), never trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

_LEFT_RIGHT = {"left": "right", "right": "left"}


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored scene: "left" and "right" swap
    in positions ("in the top left" -> "in the top right") and relations
    ("to the left of" -> "to the right of"); read and rebuilt through the
    corpus grammar (`shapes.caption_facts` / `make_caption`)."""
    from cm3leon_jax.data import shapes

    def swap(phrase):
        return None if phrase is None else " ".join(_LEFT_RIGHT.get(w, w) for w in phrase.split())

    facts = shapes.caption_facts(caption)
    return shapes.make_caption(shapes.CaptionFacts(
        shapes=tuple(dataclasses.replace(s, position=swap(s.position)) for s in facts.shapes),
        relations=tuple(dataclasses.replace(r, relation=swap(r.relation)) for r in facts.relations)))


# Minimal edits that make a hard negative of a scene (`sibling_scene`).
ATTRIBUTE_EDITS = ("kind", "color", "shrink", "swap_colors", "swap_kinds")
SPATIAL_EDITS = ("move", "flip_vertical", "transpose")
KIND_EDITS = ("kind", "swap_kinds")
EDIT_GROUPS = {"spatial": SPATIAL_EDITS, "attribute": ATTRIBUTE_EDITS, "kind": KIND_EDITS}
_FLIP_VERTICAL = {"above": "below", "below": "above", "left of": "left of", "right of": "right of"}
_TRANSPOSE = {"above": "left of", "below": "right of", "left of": "above", "right of": "below"}


def sibling_scene(specs, relations, rng: np.random.Generator, first: str = "spatial"):
    """(specs, relations) of a scene one edit away from the given one, whose
    caption differs, or None when no edit changes it.

    The edits keep the scene valid by construction (bounding boxes stay
    inside the image, apart, and relation margins hold). Attribute edits:
    change one shape's kind (every kind fills the same box) or colour; shrink
    a large shape to small about its centre; swap the colours or kinds of two
    shapes (the binding of attributes to shapes). Spatial edits: move a lone
    shape to another grid cell (placed as the generator places it); mirror
    the scene top-bottom (y -> 1 - y) or transpose it (x <-> y), re-rendered,
    so shapes stay upright while positions and relations change. The group
    `first` ("spatial", "attribute" or "kind": the kind edits alone) is tried
    first, then the others, each in random order, until the caption changes. A scene and its sibling in one batch
    are a hard negative both ways: they differ in one stated fact or binding.
    Random batches almost never hold two lone shapes alike but for their
    cell, so without spatial siblings a CLIP learns to ignore where shapes are.
    """
    from cm3leon_jax.data import shapes

    def caption(sp, rel):
        return shapes.make_caption(shapes.ShapesExample(None, "", tuple(sp), tuple(rel)).facts)

    def other(choices, current):
        return str(rng.choice([c for c in choices if c != current]))

    specs, relations = list(specs), list(relations)
    original = caption(specs, relations)
    n = len(specs)
    if first not in EDIT_GROUPS:
        raise ValueError(f"sibling edit group {first!r}; expected one of {tuple(EDIT_GROUPS)}")
    groups = [EDIT_GROUPS[first]] + [g for g in (ATTRIBUTE_EDITS, SPATIAL_EDITS) if g is not EDIT_GROUPS[first]]
    for edit in [e for group in groups for e in rng.permutation(group)]:
        new_specs, new_relations = list(specs), list(relations)
        i = int(rng.integers(n))
        j = (i + 1 + int(rng.integers(n - 1))) % n if n > 1 else i
        if edit == "kind":
            new_specs[i] = dataclasses.replace(specs[i], kind=other(shapes.KINDS, specs[i].kind))
        elif edit == "color":
            new_specs[i] = dataclasses.replace(specs[i], color=other(tuple(shapes.COLORS), specs[i].color))
        elif edit == "shrink":
            large = [k for k, sp in enumerate(specs) if sp.size != "small"]
            if not large:
                continue
            k = int(rng.choice(large))
            new_specs[k] = dataclasses.replace(specs[k], size="small",
                                               extent=float(rng.uniform(*shapes.SIZES["small"])))
        elif edit == "move":
            if n != 1:
                continue  # only a lone shape's position is stated
            grid = len(shapes.POSITIONS)
            cells = [(r, c) for r in range(grid) for c in range(grid)
                     if shapes.POSITIONS[r][c] != specs[0].position]
            row, col = cells[int(rng.integers(len(cells)))]
            reach = specs[0].extent / 2 + shapes.EDGE_MARGIN
            bounds = [(max(cell / grid + shapes.POSITION_MARGIN, reach),
                       min((cell + 1) / grid - shapes.POSITION_MARGIN, 1 - reach)) for cell in (col, row)]
            if any(lo > hi for lo, hi in bounds):
                continue
            new_specs[0] = dataclasses.replace(
                specs[0], center=tuple(float(rng.uniform(lo, hi)) for lo, hi in bounds))
        elif edit in ("swap_colors", "swap_kinds"):
            field = "color" if edit == "swap_colors" else "kind"
            new_specs[i] = dataclasses.replace(specs[i], **{field: getattr(specs[j], field)})
            new_specs[j] = dataclasses.replace(specs[j], **{field: getattr(specs[i], field)})
        else:
            table = _FLIP_VERTICAL if edit == "flip_vertical" else _TRANSPOSE
            new_specs = [dataclasses.replace(sp, center=((sp.center[0], 1.0 - sp.center[1])
                                                          if edit == "flip_vertical" else sp.center[::-1]))
                         for sp in specs]
            new_relations = [dataclasses.replace(r, relation=table[r.relation]) for r in relations]
        if caption(new_specs, new_relations) != original:
            return new_specs, new_relations
    return None


def shapes_examples_with_siblings(seed: int, num_scenes: int, resolution: int,
                                  sibling_edits: Sequence[str] = ("spatial", "attribute")):
    """(images [G S, R, R, 3], captions), G = 1 + len(sibling_edits), S =
    num_scenes: examples [0, S) of the shapes stream `seed`, then for each
    entry k of `sibling_edits` a sibling of every scene whose edit is drawn
    from that group first (`sibling_scene`, its own generator per scene and
    k). Example i + k S is scene i's k-th sibling (k >= 1): a group of G is
    one scene and its one-edit variants. A scene no edit changes is its own
    sibling (never: a kind change always changes the caption)."""
    from cm3leon_jax.data import shapes

    scenes = [shapes.generate_example(seed, i, resolution) for i in range(num_scenes)]
    images, captions = [e.image for e in scenes], [e.caption for e in scenes]
    for k, first in enumerate(sibling_edits):
        for i, e in enumerate(scenes):
            sib = sibling_scene(e.shapes, e.relations, np.random.default_rng([int(seed), i, 1 + k]), first)
            if sib is None:
                images.append(e.image)
                captions.append(e.caption)
                continue
            images.append(shapes.render(sib[0], resolution))
            captions.append(shapes.make_caption(shapes.ShapesExample(None, "", tuple(sib[0]),
                                                                     tuple(sib[1])).facts))
    return np.stack(images), captions


def shapes_examples(seed: int, start: int, num: int, resolution: int):
    """(uint8 images [num, R, R, 3], captions) of examples [start, start + num)
    of the shapes stream `seed`."""
    from cm3leon_jax.data import shapes

    examples = [shapes.generate_example(seed, i, resolution) for i in range(start, start + num)]
    return np.stack([e.image for e in examples]), [e.caption for e in examples]


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int, mirror_prob: float,
                  num_sibling_blocks: int = 0, blocks: Sequence[int] = (1,)):
    """(example indices [B], mirror flags [B]) of the batch at `step`: a pure
    function of (seed, step), distinct examples within a batch.

    With siblings (`num_sibling_blocks` K > 0) the examples are laid out as
    `shapes_examples_with_siblings` writes them (S = num_examples / (1 + K)
    scenes, then K blocks of siblings) and the batch is B / 2 pairs: a scene
    and one of its siblings, from a block drawn uniformly from `blocks`
    (1-based), each pair mirrored or not as one."""
    rng = np.random.default_rng([int(seed), int(step)])
    if num_sibling_blocks == 0:
        idx = rng.choice(num_examples, size=batch_size, replace=False)
        return idx, rng.random(batch_size) < mirror_prob
    scenes = num_examples // (1 + num_sibling_blocks)
    first = rng.choice(scenes, size=batch_size // 2, replace=False)
    block = np.asarray(blocks)[rng.integers(len(blocks), size=batch_size // 2)]
    flip = rng.random(batch_size // 2) < mirror_prob
    return np.concatenate([first, first + block * scenes]), np.concatenate([flip, flip])
