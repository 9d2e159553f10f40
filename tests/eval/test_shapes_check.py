"""The analytic shapes checker: hand-drawn images, acceptance on generated
ground truth, robustness to blur/noise/JPEG, and wrong captions rejected."""
import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cm3leon_jax.demo import shapes
from cm3leon_jax.demo.shapes import CaptionFacts, Relation, ShapeFact
from cm3leon_jax.eval import shapes_check


def _all_correct_rate(images_and_captions):
    results = [shapes_check.score(image, caption) for image, caption in images_and_captions]
    return np.mean([r["all_correct"] for r in results])


def _blur_and_noise(image, rng, sigma=1.0, noise=8.0):
    out = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
    out += rng.normal(0.0, noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _jpeg(image, quality=75):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _white(resolution=64):
    return np.full((resolution, resolution, 3), 255, np.uint8)


def test_hand_drawn_red_square():
    image = _white()
    image[10:22, 40:52] = (220, 30, 30)  # 12 px of 64 = 0.1875 wide: small
    [shape] = shapes_check.extract_facts(image)
    assert (shape.kind, shape.color, shape.size) == ("square", "red", "small")
    assert shape.center == (46 / 64, 16 / 64) and shape.position == "top right"
    assert shape.extent == pytest.approx(12 / 64, rel=0.02)
    result = shapes_check.score(image, "a small red square in the top right")
    assert result["all_correct"] and result["fraction_correct"] == 1.0
    assert set(result["facts"]) == {"count", "shape0.color", "shape0.kind", "shape0.size",
                                    "shape0.position"}
    wrong = shapes_check.score(image, "a large red square in the top right")
    assert not wrong["all_correct"] and wrong["fraction_correct"] == 0.8
    assert wrong["facts"]["shape0.size"] is False


def test_hand_drawn_two_shapes():
    image = _white()
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    image[(xx - 20) ** 2 + (yy - 44) ** 2 <= 10 ** 2] = (30, 70, 220)  # disk, diameter 20: large
    for row in range(8, 20):  # triangle: apex row 8, 12 rows, widening 1 px per side per row
        half = (row - 8 + 1) // 2
        image[row, 44 - half:44 + half + 1] = (30, 160, 50)
    found = shapes_check.extract_facts(image)
    assert [(s.kind, s.color, s.size) for s in found] == [
        ("circle", "blue", "large"), ("triangle", "green", "small")]
    above = shapes_check.score(image, "a small green triangle above a large blue circle")
    assert above["all_correct"]
    # Centres (44.5, 14)/64 and (20, 44)/64: dy = 30 px beats dx = 24.5 px, so
    # the circle is below the triangle, not to its left.
    below = shapes_check.score(image, "a large blue circle below a small green triangle")
    assert below["all_correct"]
    assert not shapes_check.score(
        image, "a large blue circle to the left of a small green triangle")["all_correct"]
    swapped = shapes_check.score(image, "a small green triangle below a large blue circle")
    assert not swapped["all_correct"] and swapped["facts"]["relation0"] is False


def test_empty_image_and_specks():
    empty = shapes_check.score(_white(), "a small red circle")
    assert empty["num_detected"] == 0 and empty["fraction_correct"] == 0.0
    image = _white()
    image[5, 5] = image[40, 30] = (220, 30, 30)  # single-pixel noise is not a shape
    assert shapes_check.extract_facts(image) == []


def test_extra_shape_fails_the_count():
    ex = next(e for e in shapes.generate(0, 50, 64) if len(e.shapes) == 1)
    assert shapes_check.score(ex.image, ex.caption)["all_correct"]
    image = ex.image.copy()
    x, y = ex.shapes[0].center  # a purple square in the farthest corner
    cols = slice(50, 60) if x < 0.5 else slice(4, 14)
    rows = slice(50, 60) if y < 0.5 else slice(4, 14)
    image[rows, cols] = shapes.COLORS["purple"]
    result = shapes_check.score(image, ex.caption)
    assert result["num_detected"] == 2 and result["facts"]["count"] is False
    assert not result["all_correct"] and result["fraction_correct"] == pytest.approx(4 / 5)


def test_moments_are_blur_invariant():
    """D_k of a blurred star equal the sharp star's (the kind features' premise)."""
    spec = shapes.ShapeSpec("star", "blue", "large", (0.5, 0.5), 0.4)
    sharp = shapes.render([spec], 256)
    [a] = shapes_check.extract_facts(sharp)
    [b] = shapes_check.extract_facts(_blur_and_noise(sharp, np.random.default_rng(0), 3.0, 0.0))
    assert a.kind == b.kind == "star"
    np.testing.assert_allclose(b.moments, a.moments, atol=1.5e-3)
    assert b.extent == pytest.approx(a.extent, rel=0.03)


def test_acceptance_64():
    """Ground truth at 64x64: every fact recovered on >= 99% of 500 images."""
    rate = _all_correct_rate((ex.image, ex.caption) for ex in shapes.generate(1234, 500, 64))
    print(f"shapes_check all_correct on 500 clean 64x64 images: {rate:.3f}")
    assert rate >= 0.99


def test_acceptance_256():
    rate = _all_correct_rate((ex.image, ex.caption) for ex in shapes.generate(4321, 50, 256))
    print(f"shapes_check all_correct on 50 clean 256x256 images: {rate:.3f}")
    assert rate >= 0.98


@pytest.mark.parametrize("degradation", ["blur1_noise8", "jpeg75"])
def test_robust_to_mild_degradation(degradation):
    rng = np.random.default_rng(0)
    degrade = {"blur1_noise8": lambda im: _blur_and_noise(im, rng),
               "jpeg75": _jpeg}[degradation]
    rate = _all_correct_rate((degrade(ex.image), ex.caption) for ex in shapes.generate(77, 200, 64))
    print(f"shapes_check all_correct on 200 64x64 images after {degradation}: {rate:.3f}")
    assert rate >= 0.9


def test_off_white_background_and_dim_colours():
    exs = list(shapes.generate(8, 60, 64))
    dim = _all_correct_rate((np.round(ex.image * 0.9).astype(np.uint8), ex.caption) for ex in exs)
    grey = _all_correct_rate(
        (np.where((ex.image == 255).all(-1, keepdims=True), np.uint8(238), ex.image), ex.caption)
        for ex in exs)
    assert dim >= 0.95 and grey >= 0.95


def _mutations(ex):
    """Captions that are false of `ex` whatever the matching: a colour absent
    from the image; the opposite relation where no two shapes look alike."""
    facts = ex.facts
    absent = [c for c in shapes.COLORS if c not in {s.color for s in ex.shapes}][0]
    recoloured = list(facts.shapes)
    first = recoloured[0]
    recoloured[0] = ShapeFact(first.kind, absent, first.size, first.position)
    yield "shape0.color", CaptionFacts(tuple(recoloured), facts.relations)
    looks = {(s.kind, s.color, s.size) for s in ex.shapes}
    if facts.relations and len(looks) == len(ex.shapes):
        opposite = {"above": "below", "below": "above", "left of": "right of",
                    "right of": "left of"}
        r = facts.relations[0]
        flipped = (Relation(r.subject, opposite[r.relation], r.object),) + facts.relations[1:]
        yield "relation0", CaptionFacts(facts.shapes, flipped)


def test_wrong_captions_are_not_all_correct():
    checked = 0
    for ex in shapes.generate(99, 100, 64):
        for fact, wrong in _mutations(ex):
            caption = shapes.make_caption(wrong)
            result = shapes_check.score(ex.image, caption)
            assert not result["all_correct"], (ex.caption, caption)
            assert result["facts"][fact] is False, (ex.caption, caption, result["facts"])
            checked += 1
    assert checked > 150
