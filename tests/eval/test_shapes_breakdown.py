"""eval/shapes_breakdown.py: per-fact and per-count summaries, by hand, and
the tokenizer's ceiling against the checker on the real images."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cm3leon_jax.eval import shapes_breakdown


def _result(facts, n):
    return {"all_correct": all(facts.values()), "fraction_correct": sum(facts.values()) / len(facts),
            "facts": facts, "num_expected": n}


def test_breakdown_by_hand():
    one = _result({"count": True, "shape0.color": True, "shape0.kind": False, "shape0.size": True,
                   "shape0.position": True}, 1)
    two = _result({"count": True, "shape0.color": True, "shape0.kind": True, "shape0.size": True,
                   "shape1.color": False, "shape1.kind": True, "shape1.size": True, "relation0": True}, 2)
    two_ok = _result({"count": True, "shape0.color": True, "shape0.kind": True, "shape1.color": True,
                      "shape1.kind": True, "relation0": False}, 2)
    got = shapes_breakdown.summarize([one, two, two_ok])
    assert got["accuracy"] == 0.0 and got["images"] == 3
    assert got["fraction_of_facts"] == pytest.approx((4 / 5 + 7 / 8 + 5 / 6) / 3)
    # kind: 1 of 1, 2 of 2, 2 of 2 stated shapes -> 4 of 5 hold (the first one does not)
    assert got["facts"]["kind"] == pytest.approx(4 / 5)
    assert got["facts"]["color"] == pytest.approx(4 / 5)
    assert got["facts"]["size"] == pytest.approx(3 / 3)
    assert got["facts"]["position"] == 1.0
    assert got["facts"]["relation"] == 0.5 and got["facts"]["count"] == 1.0
    assert got["by_shapes"] == {"1": {"accuracy": 0.0, "images": 1}, "2": {"accuracy": 0.0, "images": 2}}
    fixed = _result(dict(two_ok["facts"], relation0=True), 2)
    assert shapes_breakdown.summarize([fixed])["by_shapes"]["2"]["accuracy"] == 1.0


def test_unknown_fact_names_are_an_error():
    with pytest.raises(ValueError, match="shape0.shade"):
        shapes_breakdown.fact_type("shape0.shade")


def test_real_images_score_perfectly():
    """The checker reads ground-truth images exactly: the breakdown of the
    real images is all ones (the ceiling a perfect tokenizer gives)."""
    from cm3leon_jax.data import shapes

    exs = list(shapes.generate(5, 30))
    got = shapes_breakdown.score_images(np.stack([e.image for e in exs]), [e.caption for e in exs])
    assert got["accuracy"] == 1.0
    assert all(v == 1.0 for v in got["facts"].values()) and set(got["facts"]) == set(shapes_breakdown.FACT_TYPES)
    assert sum(v["images"] for v in got["by_shapes"].values()) == 30
    assert not math.isnan(got["fraction_of_facts"])
