"""The SFT sequence layout and the box-as-text format.

Every instruction task is one sequence (PAPER.md: "task prompt + input and
the output are concatenated into one sequence"):

    inputs   instruction <break> input <break>     (input: image codes or text)
             instruction <break>                   (tasks without an input)
    targets  output <eos>

`inputs` and `targets` are SeqIO's two features; `seqio.PrefixLMFeatureConverter`
concatenates them into one decoder sequence, and the loss falls on the
`targets` part only unless `sft_loss_on_targets_only` says otherwise
(sft/tasks.py). The model stays causal: the converter's
`decoder_causal_attention` (a prefix-LM attention mask) is not used.

Assumptions (the paper gives no template):
- the instruction comes first, so the same input (an image) sits after it
  in every task, and an editing output image is its input shifted by a
  fixed offset (input length + 1);
- `<break>` separates instruction, input and output, as it separates the
  modalities of a pretraining document (DESIGN.md, "Sequence layout");
- classifier-free guidance's unconditional streams replace the instruction
  and/or the input by one `<mask:0>`, as text-to-image CFG does; training
  drops them so (`condition_dropout`) for tasks whose output is an image.

Task families (`FAMILIES`): input and output modality of each.

Boxes are text (PAPER.md: "boxes as text tokens"): a box is four integers
`x0 y0 x1 y1`, the corners of the box in the square (centre-cropped) image,
each quantised to `NUM_BINS` bins of the image side (`x0 = floor(x * B)`,
`x1 = ceil(x * B) - 1` clipped to [0, B)), so "0 0 31 31" is the whole image
at B = 32. An object is `label x0 y0 x1 y1`; objects are joined by ", " in
raster order of their top-left corner (y0, then x0). Assumption: 32 bins
(Kosmos-2's location grid; the paper is silent), 2 pixels at 64x64.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.sampling import prompt_formats

EDITING = "editing"
GROUNDED = "grounded"          # image-to-image grounded generation (edges, segmentation, ...)
SPATIAL = "spatial"            # spatially grounded generation: text with boxes -> image
DETECTION = "detection"
CAPTIONING = "captioning"
VQA = "vqa"

# family -> (input modality or None, output modality)
FAMILIES = {
    EDITING: ("image", "image"),
    GROUNDED: ("image", "image"),
    SPATIAL: (None, "image"),
    DETECTION: ("image", "text"),
    CAPTIONING: ("image", "text"),
    VQA: ("image", "text"),
}
IMAGE_OUTPUT = tuple(f for f, (_, out) in FAMILIES.items() if out == "image")
NUM_BINS = 32


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown SFT task family {family!r}; the families are {', '.join(FAMILIES)}")
    return family


def layout(instruction: Sequence[int], input_ids: Sequence[int], output: Sequence[int]
           ) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 arrays of one example (module docstring)."""
    brk, eos = [vocab_lib.BREAK_ID], [vocab_lib.EOS_ID]
    inputs = list(instruction) + brk + (list(input_ids) + brk if len(input_ids) else [])
    return np.asarray(inputs, np.int32), np.asarray(list(output) + eos, np.int32)


def prompt_streams(instruction: Sequence[int], input_ids: Sequence[int], mask_id: int):
    """The three prompts of two-scale guidance (InstructPix2Pix's, which
    CM3Leon's editing follows): (instruction + input, input only, neither),
    the dropped parts replaced by one `<mask:0>` as in training."""
    full, _ = layout(instruction, input_ids, [])
    image_only, _ = layout([mask_id], input_ids, [])
    neither, _ = layout([mask_id], [mask_id] if len(input_ids) else [], [])
    return full.tolist(), image_only.tolist(), neither.tolist()


# -------------------------------------------------------------------- boxes as text


@dataclasses.dataclass(frozen=True)
class Box:
    """A labelled box, corners as fractions of the (square) image side."""
    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


def quantize_box(box: Box, num_bins: int = NUM_BINS) -> Tuple[int, int, int, int]:
    def lo(v):
        return int(min(max(math.floor(v * num_bins + 1e-9), 0), num_bins - 1))

    def hi(v):
        return int(min(max(math.ceil(v * num_bins - 1e-9) - 1, 0), num_bins - 1))

    x0, y0 = lo(box.x0), lo(box.y0)
    return x0, y0, max(hi(box.x1), x0), max(hi(box.y1), y0)


def dequantize(x0: int, y0: int, x1: int, y1: int, label: str = "", num_bins: int = NUM_BINS) -> Box:
    """The box a quantised one stands for: bins x0..x1 inclusive."""
    return Box(label, x0 / num_bins, y0 / num_bins, (x1 + 1) / num_bins, (y1 + 1) / num_bins)


def boxes_to_text(boxes: Sequence[Box], num_bins: int = NUM_BINS) -> str:
    """"label x0 y0 x1 y1, label ..." in raster order (module docstring)."""
    q = [(quantize_box(b, num_bins), b.label) for b in boxes]
    q.sort(key=lambda t: (t[0][1], t[0][0], t[1]))
    return ", ".join(f"{label} {x0} {y0} {x1} {y1}" for (x0, y0, x1, y1), label in q)


_OBJECT = re.compile(r"^\s*(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def text_to_boxes(text: str, num_bins: int = NUM_BINS) -> List[Box]:
    """Parses `boxes_to_text` output; pieces that do not parse (a model's
    malformed output) are dropped."""
    out = []
    for piece in text.split(","):
        m = _OBJECT.match(piece)
        if not m:
            continue
        x0, y0, x1, y1 = (int(v) for v in m.groups()[1:])
        if max(x0, y0, x1, y1) >= num_bins or x1 < x0 or y1 < y0:
            continue
        out.append(dequantize(x0, y0, x1, y1, m.group(1).strip(), num_bins))
    return out


def iou(a: Box, b: Box) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(0.0, w) * max(0.0, h)
    union = a.area() + b.area() - inter
    return inter / union if union > 0 else 0.0


def matched_iou(truth: Sequence[Box], predicted: Sequence[Box]) -> List[float]:
    """Per true box, the IoU of the predicted box matched to it: the one-to-one
    assignment with the largest total IoU among same-label pairs (Hungarian,
    scipy), 0 for a true box left unmatched (missing or wrongly labelled)."""
    from scipy.optimize import linear_sum_assignment

    if not truth:
        return []
    if not predicted:
        return [0.0] * len(truth)
    m = np.array([[iou(t, p) if t.label == p.label else 0.0 for p in predicted] for t in truth])
    rows, cols = linear_sum_assignment(-m)
    out = [0.0] * len(truth)
    for r, c in zip(rows, cols):
        out[r] = float(m[r, c])
    return out


def crop_box(box_xywh, width: float, height: float, label: str) -> Optional[Box]:
    """A box [x, y, w, h] in pixels of a `width` x `height` image -> the Box
    in the centre-cropped square the data pipeline makes
    (`data.images.resize_center_crop`), clipped to it; None when nothing of
    it is left inside."""
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    x, y, w, h = (float(v) for v in box_xywh)
    x0, y0 = (x - ox) / side, (y - oy) / side
    x1, y1 = (x + w - ox) / side, (y + h - oy) / side
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
    if x1 <= x0 or y1 <= y0:
        return None
    return Box(label, x0, y0, x1, y1)


prompt_formats.register_layout("sft", layout)
