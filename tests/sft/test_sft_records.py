"""Instruction records -> prepared SFT data (tiny random VQ-GAN + BPE): the
shapes instruction corpus's ground truth, and bad records skipped and
counted by reason."""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
from task_data import make_bpe, make_vq_dir  # noqa: E402

from cm3leon_jax import vocab as vocab_lib  # noqa: E402
from cm3leon_jax.data import shapes  # noqa: E402
from cm3leon_jax.sft import shapes_instructions as instructions  # noqa: E402
from cm3leon_jax.sft import format as fmt  # noqa: E402
from cm3leon_jax.sft import records  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft_models")
    return make_vq_dir(str(base / "vqgan")), make_bpe(str(base / "text"), 320)


def test_shapes_instruction_ground_truth():
    ex = shapes.generate_example(1234, 5)
    for q in instructions.questions(ex):
        if q["type"] == "count":
            assert q["answer"] == instructions.COUNT_WORDS[len(ex.shapes)]
        if q["type"] == "color":
            (s,) = [s for s in ex.shapes if s.kind in q["question"]]
            assert q["answer"] == s.color
    for family in fmt.FAMILIES:
        for r in instructions.records(family, "validation", 5):
            m = r["meta"]
            scene = shapes.generate_example(m["seed"], m["index"])
            if family == fmt.EDITING:
                after = instructions.edit_scene(scene.shapes, m["op"], m["target"], m.get("new_color"))
                assert np.array_equal(r["output_image"], shapes.render(after, 64))
                assert len(after) == len(scene.shapes) - (m["op"] == "remove")
            if family == fmt.DETECTION:
                # the boxes hold the rendered pixels of each shape exactly
                for spec, b in zip(scene.shapes, m["boxes"]):
                    rows, cols = np.nonzero(shapes.shape_mask(spec, 64))
                    assert (b["x0"] * 64, b["x1"] * 64) == (cols.min(), cols.max() + 1)
                    assert (b["y0"] * 64, b["y1"] * 64) == (rows.min(), rows.max() + 1)
                assert sorted(x.label for x in fmt.text_to_boxes(r["output_text"])) == sorted(
                    f"{s.color} {s.kind}" for s in scene.shapes)
    # train and held-out scenes come from different streams
    assert instructions.stream("vqa", "train") != instructions.stream("vqa", "validation")


def test_prepare_counts_bad_records_and_keeps_the_good(tokenizers, tmp_path):
    vq, bpe = tokenizers
    img = tmp_path / "img.png"
    Image.fromarray(shapes.generate_example(0, 0, 32).image).save(img)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"id": "a", "task": "vqa", "instruction": "what colour is it?", "input_image": "img.png",
            "output_text": "red", "meta": {"answer": "red"}}
    lines = [json.dumps(good),
             json.dumps(dict(good, id="b", input_image="missing.png")),
             json.dumps(dict(good, id="c", input_image="corrupt.png")),
             json.dumps(dict(good, id="d", output_text="  ")),
             json.dumps(dict(good, id="e", instruction="")),
             json.dumps(dict(good, id="f", task="dance")),
             json.dumps(dict(good, id="g", output_text="word " * 200)),
             json.dumps({"id": "h", "task": "editing", "instruction": "make it blue", "input_image": "img.png",
                         "output_image": "img.png"}),
             "not json"]
    src = tmp_path / "instructions.jsonl"
    src.write_text("\n".join(lines) + "\n")
    entry = records.prepare_sft(str(src), str(tmp_path / "out"), vq, bpe, progress=False)
    assert entry["count"] == 2
    assert entry["skipped"] == {"missing file": 1, "corrupt or truncated image": 1, "empty output": 1,
                                "empty instruction": 1, "unknown task family": 1, "over-long": 1,
                                "not a JSON object": 1}
    assert entry["families"]["vqa"] == {"count": 1, "max_inputs_length": entry["families"]["vqa"]["max_inputs_length"],
                                        "max_targets_length": entry["families"]["vqa"]["max_targets_length"]}
    (rec,) = records.read_examples(str(tmp_path / "out"), "vqa", "train")
    man = records.read_manifest(str(tmp_path / "out"))
    vocab = vocab_lib.UnifiedVocabulary(**man["vocabulary"])
    from cm3leon_jax.data.tokenizers import TextTokenizer

    text = TextTokenizer(bpe, vocab)
    assert text.decode(rec["output"]) == "red" and text.decode(rec["instruction"]) == "what colour is it?"
    assert vocab.is_image(rec["input"]).all() and len(rec["input"]) == 16  # 32x32 -> 4x4 codes
    assert rec["meta"] == {"answer": "red"} and rec["id"] == "a"
    (edit,) = records.read_examples(str(tmp_path / "out"), "editing", "train")
    assert np.array_equal(edit["input"], edit["output"])  # the same image in and out: the same codes


def test_prepare_cleans_text_and_survives_any_line(tokenizers, tmp_path):
    """Issue 26: a lone surrogate (valid JSON) in an instruction, control
    characters, a non-string output, non-UTF-8 bytes and JSON Python cannot
    read lose nothing: each good record is kept with its text cleaned, each
    bad one counted."""
    vq, bpe = tokenizers
    Image.fromarray(shapes.generate_example(0, 0, 32).image).save(tmp_path / "img.png")
    good = {"id": "a", "task": "vqa", "instruction": "what colour \udcff is it?\x07", "input_image": "img.png",
            "output_text": "red", "meta": {"answer": "red"}}
    lines = [json.dumps(good).encode(),
             json.dumps(dict(good, id="b\udcff", output_text=["red"])).encode(),
             b'{"id": "c", "task": "vqa", "instruction": "caf\xe9?", "input_image": "img.png", "output_text": "x"}',
             b"[" * 100_000, b'{"id": ' + b"9" * 5000 + b"}"]
    src = tmp_path / "instructions.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    entry = records.prepare_sft(str(src), str(tmp_path / "out"), vq, bpe, progress=False)
    assert entry["count"] == 2
    assert entry["skipped"] == {"output text is not a string": 1, "not a JSON object": 2}
    man = records.read_manifest(str(tmp_path / "out"))
    from cm3leon_jax.data.tokenizers import TextTokenizer

    text = TextTokenizer(bpe, vocab_lib.UnifiedVocabulary(**man["vocabulary"]))
    got = sorted(text.decode(r["instruction"]) for r in records.read_examples(str(tmp_path / "out"), "vqa", "train"))
    assert got == ["caf\ufffd?", "what colour \ufffd is it?"]


def test_a_failed_rerun_keeps_the_split_and_a_finished_one_replaces_it(tokenizers, tmp_path):
    """Never lost work: the old shards of a split go only once the rerun has
    written its own. A rerun that dies part-way (here: its record stream
    raises after one record) leaves the previous split readable; a finished
    rerun replaces the whole split, every family's shards."""
    vq, bpe = tokenizers
    Image.fromarray(shapes.generate_example(0, 0, 32).image).save(tmp_path / "img.png")
    vqa = {"id": "a", "task": "vqa", "instruction": "what colour is it?", "input_image": "img.png",
           "output_text": "red", "meta": {"answer": "red"}}
    cap = {"id": "c", "task": "captioning", "instruction": "describe it", "input_image": "img.png",
           "output_text": "a red circle"}
    out = str(tmp_path / "out")
    src = tmp_path / "first.jsonl"
    src.write_text(json.dumps(vqa) + "\n" + json.dumps(cap) + "\n")
    records.prepare_sft(str(src), out, vq, bpe, progress=False)

    def dies():
        yield dict(vqa, id="z", output_text="blue", input_image=str(tmp_path / "img.png"))
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        records.prepare_sft(dies(), out, vq, bpe, progress=False, batch_size=1)
    assert [r["id"] for r in records.read_examples(out, "vqa", "train")] == ["a"]
    assert [r["id"] for r in records.read_examples(out, "captioning", "train")] == ["c"]

    src2 = tmp_path / "second.jsonl"
    src2.write_text(json.dumps(dict(vqa, id="b")) + "\n")
    entry = records.prepare_sft(str(src2), out, vq, bpe, progress=False)
    assert entry["count"] == 1
    assert [r["id"] for r in records.read_examples(out, "vqa", "train")] == ["b"]
    assert not records.read_examples(out, "captioning", "train")
    assert not glob.glob(os.path.join(out, "*", "*.tmp"))
