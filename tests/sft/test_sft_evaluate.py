"""`cm3leon sft eval`'s scores (sft/evaluate.py) against the exact ground
truth of the shapes instruction records: the truth scores full marks, and
worked wrong answers score what they should."""
from __future__ import annotations

import numpy as np
import pytest

from cm3leon_jax.data import shapes
from cm3leon_jax.sft import evaluate
from cm3leon_jax.sft import format as fmt
from cm3leon_jax.sft import shapes_instructions as instructions


def _records(family, num):
    return list(instructions.records(family, "validation", num))


def test_vqa_exact_match_by_type_worked_by_hand():
    metas = [{"type": "color", "answer": "red"}, {"type": "color", "answer": "blue"},
             {"type": "count", "answer": "two"}, {"type": "where", "answer": "top left"}]
    r = evaluate.vqa_scores(["Red.", "green", "two", "top  left"], metas)
    assert r["exact_match"] == pytest.approx(0.75)
    assert r["by_type"] == {"color": 0.5, "count": 1.0, "where": 1.0}
    assert evaluate.normalize_answer("  Top-Left! ") == "top left"


def _recolour_first(caption):
    """The caption with its first shape's colour word changed."""
    words = caption.split()
    i = next(k for k, w in enumerate(words) if w in shapes.COLORS)
    words[i] = next(c for c in shapes.COLORS if c != words[i])
    return " ".join(words)


def test_captions_score_the_truth_full_and_a_wrong_colour_less():
    recs = _records(fmt.CAPTIONING, 6)
    metas = [r["meta"] for r in recs]
    truth = evaluate.caption_scores([r["output_text"] for r in recs], metas, 64)
    assert truth["facts"] == 1.0 and truth["all_correct"] == 1.0 and truth["unparsed"] == 0
    wrong = [_recolour_first(r["output_text"]) for r in recs]
    r = evaluate.caption_scores(wrong + ["not a caption"], metas + metas[:1], 64)
    assert r["all_correct"] == 0.0 and 0.0 < r["facts"] < 1.0 and r["unparsed"] == 1 and r["count"] == 7


def test_detection_iou_of_the_truth_and_of_a_shifted_box():
    recs = _records(fmt.DETECTION, 4)
    metas = [r["meta"] for r in recs]
    truth = evaluate.detection_scores([r["output_text"] for r in recs], metas)
    assert truth["mean_iou"] > 0.85 and truth["recall_at_0.5"] == 1.0  # 32-bin quantisation only
    assert truth["boxes"] == sum(len(m["boxes"]) for m in metas)
    b = fmt.Box(**metas[0]["boxes"][0])
    w = b.x1 - b.x0
    shifted = fmt.boxes_to_text([fmt.Box(b.label, b.x0 + w / 2, b.y0, b.x1 + w / 2, b.y1)])
    one = evaluate.detection_scores([shifted], [dict(metas[0], boxes=metas[0]["boxes"][:1])])
    assert 0.2 < one["mean_iou"] < 0.45  # half the width off: IoU about 1/3
    assert evaluate.detection_scores([""], metas[:1])["mean_iou"] == 0.0


def test_edits_succeed_on_the_edited_scene_and_fail_on_the_input():
    recs = _records(fmt.EDITING, 8)
    metas = [r["meta"] for r in recs]
    edited = np.stack([r["output_image"] for r in recs])
    inputs = np.stack([r["input_image"] for r in recs])
    assert evaluate.edit_scores(edited, metas, 64)["success"] == 1.0
    unchanged = evaluate.edit_scores(inputs, metas, 64)
    assert unchanged["change"] == 0.0 and unchanged["success"] == 0.0 and unchanged["preserved"] < 1.0
    assert set(unchanged["by_op"]) <= {"recolour", "remove"}


def test_generated_images_scored_by_their_captions():
    recs = _records(fmt.GROUNDED, 4)
    images = np.stack([r["output_image"] for r in recs])
    assert evaluate.image_caption_scores(images, [r["meta"] for r in recs])["accuracy"] == 1.0
    blank = np.full_like(images, 255)
    assert evaluate.image_caption_scores(blank, [r["meta"] for r in recs])["accuracy"] == 0.0
