"""The procedural shapes corpus: determinism, the caption grammar, rendering."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import shapes
from cm3leon_jax.data import shapes_corpus
from cm3leon_jax.data.shapes import CaptionFacts, Relation, ShapeFact, ShapeSpec


@pytest.mark.parametrize("resolution", [64, 256])
def test_same_seed_index_resolution_gives_same_bytes(resolution):
    a = shapes.generate_example(3, 17, resolution)
    b = shapes.generate_example(3, 17, resolution)
    assert a.image.dtype == np.uint8 and a.image.shape == (resolution, resolution, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.caption == b.caption and a.shapes == b.shapes and a.relations == b.relations


def test_different_seeds_differ():
    for index in range(10):
        a, b = shapes.generate_example(0, index), shapes.generate_example(1, index)
        assert a.image.tobytes() != b.image.tobytes()
    captions = [[shapes.generate_example(seed, i).caption for i in range(10)] for seed in (0, 1)]
    assert captions[0] != captions[1]


def test_example_i_is_random_access():
    stream = list(shapes.generate(5, 12, 64))
    for i in (0, 7, 11):
        ex = shapes.generate_example(5, i, 64)
        assert ex.caption == stream[i].caption
        assert ex.image.tobytes() == stream[i].image.tobytes()
    later = list(shapes.generate(5, 3, 64, start=9))
    assert [e.caption for e in later] == [e.caption for e in stream[9:12]]


def test_scene_does_not_depend_on_resolution():
    for i in range(5):
        a, b = shapes.generate_example(2, i, 64), shapes.generate_example(2, i, 256)
        assert a.caption == b.caption and a.shapes == b.shapes


def test_caption_facts_hand_worked():
    assert shapes.caption_facts("a small red circle above a large blue square") == CaptionFacts(
        shapes=(ShapeFact("circle", "red", "small"), ShapeFact("square", "blue", "large")),
        relations=(Relation(0, "above", 1),))
    assert shapes.caption_facts("a large green triangle in the top left") == CaptionFacts(
        shapes=(ShapeFact("triangle", "green", "large", "top left"),), relations=())
    # Relations chain: A right-of B, B below C; nothing about A and C.
    assert shapes.caption_facts(
        "a small purple star to the right of a large yellow diamond below a small red square"
    ) == CaptionFacts(
        shapes=(ShapeFact("star", "purple", "small"), ShapeFact("diamond", "yellow", "large"),
                ShapeFact("square", "red", "small")),
        relations=(Relation(0, "right of", 1), Relation(1, "below", 2)))
    # The size may be left out; case and a final full stop do not matter.
    assert shapes.caption_facts("A blue square to the left of an orange circle.") == CaptionFacts(
        shapes=(ShapeFact("square", "blue"), ShapeFact("circle", "orange")),
        relations=(Relation(0, "left of", 1),))


@pytest.mark.parametrize("caption, word", [
    ("a small pink circle", "'pink'"),
    ("a small red blob", "'blob'"),
    ("a small red circle near a blue square", "'near'"),
    ("a small red circle above", "the end"),
    ("small red circle", "'small'"),
])
def test_caption_facts_names_the_bad_word(caption, word):
    with pytest.raises(ValueError, match=word):
        shapes.caption_facts(caption)


def test_make_caption_hand_worked():
    facts = CaptionFacts((ShapeFact("star", "orange", "small", "center"),), ())
    assert shapes.make_caption(facts) == "a small orange star in the center"
    facts = CaptionFacts((ShapeFact("circle", "orange"), ShapeFact("square", "red", "large")),
                         (Relation(0, "below", 1),))
    assert shapes.make_caption(facts) == "an orange circle below a large red square"


def test_swap_attribute_hand_worked():
    c = "a large red diamond below a small yellow square to the left of a small blue square"
    assert shapes.swap_attribute(c, "kind") == \
        "a large red square below a small yellow diamond to the left of a small blue square"
    assert shapes.swap_attribute(c, "color") == \
        "a large yellow diamond below a small red square to the left of a small blue square"
    assert shapes.swap_attribute(c, "size") == \
        "a small red diamond below a large yellow square to the left of a small blue square"
    # the first two shapes agree in kind: the first differing pair is swapped
    assert shapes.swap_attribute("a red circle above a blue circle to the left of a green star", "kind") == \
        "a red star above a blue circle to the left of a green circle"
    same = "a small red square above a small blue square"
    assert shapes.swap_attribute(same, "kind") is None and shapes.swap_attribute(same, "size") is None
    assert shapes.swap_attribute("a large blue triangle on the left", "color") is None
    # relation: the first relation turned to its opposite, the rest kept
    assert shapes.swap_attribute(c, "relation") == \
        "a large red diamond above a small yellow square to the left of a small blue square"
    assert shapes.swap_attribute("a red star to the right of a blue circle", "relation") == \
        "a red star to the left of a blue circle"
    assert shapes.swap_attribute("a large blue triangle on the left", "relation") is None
    with pytest.raises(ValueError, match="attribute must be"):
        shapes.swap_attribute(same, "position")


def test_captions_parse_back_into_the_facts_they_were_made_from():
    for ex in shapes.generate(11, 300, 32):
        assert shapes.caption_facts(ex.caption) == ex.facts, ex.caption
        assert shapes.make_caption(ex.facts) == ex.caption


def test_scenes_satisfy_what_the_caption_states():
    """Independent of the checker: every stated fact holds for the drawn specs,
    each shape's own pixels are all there in its colour (so none overlap)."""
    seen = set()
    for ex in shapes.generate(4, 200, 64):
        n = len(ex.shapes)
        assert 1 <= n <= 3 and len(ex.relations) == n - 1
        masks = [shapes.shape_mask(s, 64) for s in ex.shapes]
        assert not np.any(np.sum(masks, axis=0) > 1)
        for s, mask in zip(ex.shapes, masks):
            seen.update([s.kind, s.color, s.size])
            lo, hi = shapes.SIZES[s.size]
            assert lo <= s.extent <= hi
            reach = s.extent / 2 + shapes.EDGE_MARGIN
            assert all(reach <= c <= 1 - reach for c in s.center)
            assert mask.sum() > 0 and np.all(ex.image[mask] == shapes.COLORS[s.color])
        background = ~np.any(masks, axis=0)
        assert np.all(ex.image[background] == shapes.BACKGROUND)
        for r in ex.relations:
            assert shapes.relation_holds(r.relation, ex.shapes[r.subject].center,
                                         ex.shapes[r.object].center, shapes.RELATION_MARGIN)
        if n == 1:
            assert ex.facts.shapes[0].position == shapes.grid_position(*ex.shapes[0].center)
    assert seen == set(shapes.KINDS) | set(shapes.COLORS) | set(shapes.SIZES)


def test_render_hand_worked():
    # 8x8, pixel centres at (i + 0.5) / 8; a square of side 0.25 about the
    # centre covers centres 0.4375 and 0.5625: rows and columns 3 and 4.
    image = shapes.render([ShapeSpec("square", "red", "small", (0.5, 0.5), 0.25)], 8)
    expected = np.zeros((8, 8), bool)
    expected[3:5, 3:5] = True
    assert np.array_equal((image == shapes.COLORS["red"]).all(-1), expected)
    assert np.all(image[~expected] == shapes.BACKGROUND)
    # Triangle, apex up, base = height = 0.5: a pixel is in when dy <= 0.25 and
    # 2|dx| <= dy + 0.25 (dx, dy from the centre): rows 3-4 two wide, row 5 four.
    tri = shapes.shape_mask(ShapeSpec("triangle", "red", "large", (0.5, 0.5), 0.5), 8)
    assert [''.join('#' if v else '.' for v in row) for row in tri[2:7]] == [
        "........", "...##...", "...##...", "..####..", "........"]
    assert not tri[:2].any() and not tri[7:].any()


def test_write_corpus(tmp_path):
    path = shapes_corpus.write_corpus(str(tmp_path), seed=9, num=4, resolution=32)
    assert path == os.path.join(str(tmp_path), "captions.jsonl")
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    expected = list(shapes.generate(9, 4, 32))
    assert [line["file"] for line in lines] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for line, ex in zip(lines, expected):
        assert line["caption"] == ex.caption
        assert np.array_equal(np.asarray(Image.open(tmp_path / line["file"])), ex.image)


def test_corpus_thinned_by_shape_count(tmp_path):
    counts = [len(shapes.generate_example(5, k).shapes) for k in range(60)]
    # weights (0, 1, 1): no single-shape scene; every other scene kept, in stream order
    kept = list(shapes_corpus.kept_indices(5, 20, (0, 1, 1)))
    assert kept == [k for k in range(60) if counts[k] > 1][:20]
    assert list(shapes_corpus.kept_indices(5, 7, (2, 2, 2))) == list(range(7))  # equal weights keep all
    # (1, 2, 2): a single-shape scene is kept with probability 1/2, by its own draw
    half = list(shapes_corpus.kept_indices(5, 30, (1, 2, 2)))
    singles = [k for k in range(max(half) + 1) if counts[k] == 1]
    assert 0 < sum(k in half for k in singles) < len(singles)
    assert all(k in half for k in range(max(half) + 1) if counts[k] > 1)
    path = shapes_corpus.write_corpus(str(tmp_path), seed=5, num=3, resolution=32, shape_count_weights=(0, 0, 1))
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    threes = [shapes.generate_example(5, k, 32) for k in range(60) if counts[k] == 3][:3]
    assert [line["caption"] for line in lines] == [ex.caption for ex in threes]
    for line, ex in zip(lines, threes):  # each the stream's own example, image included
        assert np.array_equal(np.asarray(Image.open(tmp_path / line["file"])), ex.image)
    with pytest.raises(ValueError, match="shape_count_weights"):
        list(shapes_corpus.kept_indices(5, 1, (1, 1)))
    with pytest.raises(ValueError, match="shape_count_weights"):
        list(shapes_corpus.kept_indices(5, 1, (0, 0, 0)))
