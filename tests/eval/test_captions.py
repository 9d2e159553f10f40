"""Caption scores (eval/captions.py): pycocoevalcap's CIDEr / BLEU on
inputs whose scores are known, through the function and the CLI."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from cm3leon_jax.eval import captions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import run_cli  # noqa: E402

REFS = {1: ["a red circle above a blue square", "a red circle over a blue square"],
        2: ["a small green star", "a green star"],
        3: ["a large yellow triangle left of a purple diamond"]}


def test_perfect_predictions_score_bleu_1_and_beat_wrong_ones():
    perfect = {1: "A red circle above a blue square.", 2: "a small green star", 3: REFS[3][0]}
    wrong = {1: "a purple diamond", 2: "a large blue square", 3: "a red circle"}
    good, bad = captions.score_captions(REFS, perfect, "simple"), captions.score_captions(REFS, wrong, "simple")
    assert good["bleu_4"] == pytest.approx(1.0, abs=1e-6) and good["num_images"] == 3
    assert bad["bleu_4"] < 0.1 and bad["cider"] < good["cider"]
    assert good["tokenizer"] == "simple"


def test_bleu_1_by_hand():
    # one image, candidate "a red star" vs reference "a red circle": unigram precision 2/3,
    # candidate as long as the reference (no brevity penalty): BLEU-1 = 2/3
    got = captions.score_captions({"x": ["a red circle"]}, {"x": "a red star"}, "simple")
    assert got["bleu"][0] == pytest.approx(2 / 3, abs=1e-6)
    # an empty prediction scores 0
    assert captions.score_captions({"x": ["a red circle"]}, {"x": ""}, "simple")["bleu_4"] < 1e-6


def test_simple_tokenizer():
    assert captions.simple_tokenize("A Red-circle, above (a) blue square.") == "a red circle above a blue square"


@pytest.mark.skipif(shutil.which("java") is None, reason="COCO's PTB tokenizer needs java")
def test_ptb_tokenizer_agrees_on_plain_captions():
    preds = {1: "a red circle over a blue square", 2: "a green star", 3: "a large yellow triangle"}
    ptb, simple = captions.score_captions(REFS, preds, "ptb"), captions.score_captions(REFS, preds, "simple")
    assert ptb["tokenizer"] == "ptb"
    assert ptb["cider"] == pytest.approx(simple["cider"], rel=1e-6)
    assert ptb["bleu_4"] == pytest.approx(simple["bleu_4"], rel=1e-6)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="ids differ"):
        captions.score_captions(REFS, {1: "a red circle"}, "simple")
    with pytest.raises(ValueError, match="no non-empty reference"):
        captions.score_captions({1: ["", " "]}, {1: "a red circle"}, "simple")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prediction": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        captions.read_predictions(str(bad))


def test_cli(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prediction": v[0], "references": v}) + "\n"
                            for k, v in REFS.items()))
    proc = run_cli(["eval", "captions", f"--predictions={path}", "--tokenizer=simple",
                    f"--out={tmp_path / 'c.json'}"])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "c.json").read_text())
    assert out["bleu_4"] == pytest.approx(1.0, abs=1e-6) and out["num_images"] == 3
    proc = run_cli(["eval", "captions", f"--predictions={tmp_path / 'none.jsonl'}"], check=False)
    assert proc.returncode == 2 and "cannot read" in proc.stderr
