"""The analytic shapes checker: hand-drawn images, acceptance on generated
ground truth, robustness to blur/noise/JPEG, and wrong captions rejected."""
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cm3leon_jax.data import shapes
from cm3leon_jax.data.shapes import CaptionFacts, Relation, ShapeFact
from cm3leon_jax.data import shapes_check


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


def _touching_pair(rng, resolution=64):
    """Two random shapes moved together along a random direction until they
    touch (8-connected after a mild blur): one component, two shapes."""
    while True:
        specs = [shapes.ShapeSpec(shapes.KINDS[rng.integers(5)], c, "large",
                                  (0.5, 0.5), float(rng.uniform(0.2, 0.4))) for c in ("red", "blue")]
        angle = rng.uniform(0, 2 * np.pi)
        a = shapes.shape_mask(specs[0], resolution)
        for r in np.linspace(0.05, 0.5, 60):
            centre = (0.5 + r * np.cos(angle), 0.5 + r * np.sin(angle))
            b = shapes.shape_mask(dataclasses.replace(specs[1], center=centre), resolution)
            if not (a & b).any():
                break
        union = ndimage.gaussian_filter((a | b).astype(float), 0.7) >= 0.5
        if ndimage.label(union, np.ones((3, 3)))[1] == 1:
            return union


def test_one_shape_misfit_separates_single_shapes_from_touching_pairs():
    """The rule that keeps a two-toned shape whole: blurred single shapes fit
    a kind's outline, unions of two touching shapes do not."""
    rng = np.random.default_rng(0)
    single = []
    for _ in range(150):
        spec = shapes.ShapeSpec(shapes.KINDS[rng.integers(5)], "red", "large",
                                tuple(rng.uniform(0.3, 0.7, 2)), float(rng.uniform(0.2, 0.4)))
        blurred = ndimage.gaussian_filter(shapes.shape_mask(spec, 64).astype(float), rng.uniform(0.3, 1.2))
        single.append(shapes_check._outline_misfit(ndimage.binary_fill_holes(blurred >= 0.5)))
    pairs = [shapes_check._outline_misfit(_touching_pair(rng)) for _ in range(150)]
    assert max(single) < shapes_check.ONE_SHAPE_MISFIT / 1.5
    assert min(pairs) > shapes_check.ONE_SHAPE_MISFIT * 1.5


def test_two_toned_shape_is_one_shape_and_touching_shapes_are_two():
    yellow, orange = shapes.COLORS["yellow"], shapes.COLORS["orange"]
    image = shapes.render([shapes.ShapeSpec("circle", "yellow", "large", (0.5, 0.5), 0.35)], 64)
    right = (image == yellow).all(-1) & (np.arange(64)[None, :] >= 36)
    image[right] = orange  # 40% of the disc shaded orange
    [one] = shapes_check.extract_facts(image)
    assert (one.kind, one.color) == ("circle", "yellow")
    assert shapes_check.score(image, "a large yellow circle in the center")["all_correct"]
    # A red square and a blue circle that touch stay two shapes.
    image = _white()
    image[20:36, 10:26] = shapes.COLORS["red"]
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    image[(xx - 34) ** 2 + (yy - 28) ** 2 <= 8 ** 2] = shapes.COLORS["blue"]
    found = shapes_check.extract_facts(image)
    assert sorted((s.kind, s.color) for s in found) == [("circle", "blue"), ("square", "red")]


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
