"""Each real-data converter turns a small fixture (written here, in the
dataset's own layout) into the expected instruction records, and skips
(counting) a record naming a missing image."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.sft import sources as sft_sources
from cm3leon_jax.sft import format as fmt
from cm3leon_jax.sft import records


def _jpg(path, w=40, h=30):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def test_instructpix2pix(tmp_path):
    src = tmp_path / "ip2p"
    for d, seeds in (("0001", [11, 12]), ("0002", [21])):
        os.makedirs(src / d)
        (src / d / "prompt.json").write_text(json.dumps(
            {"input": f"photo {d}", "edit": f"make it snow {d}", "output": f"snowy photo {d}"}))
        for s in seeds:
            _jpg(str(src / d / f"{s}_0.jpg"))
            if s != 12:  # seed 12 lacks its edited image
                _jpg(str(src / d / f"{s}_1.jpg"))
    (src / "seeds.json").write_text(json.dumps([["0001", [11, 12]], ["0002", [21]]]))
    recs, skipped = sft_sources.instructpix2pix(str(src))
    assert skipped == {"missing image": 1}
    assert [(r["task"], r["instruction"], os.path.basename(r["input_image"]), os.path.basename(r["output_image"]))
            for r in recs] == [("editing", "make it snow 0001", "11_0.jpg", "11_1.jpg"),
                               ("editing", "make it snow 0002", "21_0.jpg", "21_1.jpg")]
    assert recs[0]["meta"] == {"input_caption": "photo 0001", "output_caption": "snowy photo 0001"}
    # through the JSONL: paths relative to it, read back absolute
    report = sft_sources.convert("instructpix2pix", str(src / "out" / "ip2p.jsonl"), src=str(src))
    assert report["records"] == 2 and report["skipped"] == {"missing image": 1}
    back = list(records.read_jsonl(str(src / "out" / "ip2p.jsonl")))
    assert back[0]["input_image"] == str(src / "0001" / "11_0.jpg")


def test_coco_captions(tmp_path):
    _jpg(str(tmp_path / "img" / "a.jpg"))
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                      {"id": 2, "file_name": "gone.jpg", "width": 40, "height": 30}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "A dog. "}, {"id": 11, "image_id": 1, "caption": ""},
                           {"id": 12, "image_id": 2, "caption": "A cat."}]}
    (tmp_path / "cap.json").write_text(json.dumps(ann))
    recs, skipped = sft_sources.coco_captions(str(tmp_path / "cap.json"), str(tmp_path / "img"))
    assert skipped == {"empty text": 1, "missing image": 1}
    (r,) = recs
    assert (r["task"], r["instruction"], r["output_text"], r["meta"]) == (
        "captioning", sft_sources.CAPTION_INSTRUCTION, "A dog.", {"image_id": 1})


def test_vqa_v2(tmp_path):
    _jpg(str(tmp_path / "img" / "COCO_train2014_000000000007.jpg"))
    q = {"data_subtype": "train2014", "questions": [
        {"image_id": 7, "question": "What colour is the bus?", "question_id": 70},
        {"image_id": 8, "question": "Is it raining?", "question_id": 80}]}
    a = {"annotations": [
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}, {"answer": "dark red"}]},
        {"question_id": 80, "image_id": 8, "multiple_choice_answer": "no", "answers": [{"answer": "no"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    recs, skipped = sft_sources.vqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(tmp_path / "img"))
    assert skipped == {"missing image": 1}
    (r,) = recs
    assert (r["task"], r["instruction"], r["output_text"]) == ("vqa", "What colour is the bus?", "red")
    assert r["meta"]["answers"] == ["red", "dark red"]


def test_coco_detection_boxes_in_the_centre_crop(tmp_path):
    _jpg(str(tmp_path / "img" / "a.jpg"), w=200, h=100)
    inst = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                       {"id": 2, "file_name": "gone.jpg", "width": 50, "height": 50}],
            "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "cat"}],
            "annotations": [{"image_id": 1, "bbox": [60, 10, 40, 50], "category_id": 3, "iscrowd": 0},
                            {"image_id": 1, "bbox": [0, 0, 40, 40], "category_id": 4, "iscrowd": 0},  # cut off
                            {"image_id": 1, "bbox": [50, 0, 100, 100], "category_id": 4, "iscrowd": 1},
                            {"image_id": 2, "bbox": [0, 0, 10, 10], "category_id": 4, "iscrowd": 0}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    recs, skipped = sft_sources.coco_detection(str(tmp_path / "inst.json"), str(tmp_path / "img"))
    assert skipped == {"box outside the crop": 1, "crowd box": 1, "missing image": 2}
    det, spatial = recs
    # the 100 x 100 crop starts at x = 50: the dog is x 0.1..0.5, y 0.1..0.6 -> bins 3..15, 3..19 of 32
    assert det["output_text"] == "dog 3 3 15 19"
    assert (det["task"], det["instruction"]) == ("detection", sft_sources.DETECT_INSTRUCTION)
    assert (spatial["task"], spatial["instruction"], spatial["output_image"]) == (
        "spatial", "draw: dog 3 3 15 19", str(tmp_path / "img" / "a.jpg"))
    assert fmt.text_to_boxes(det["output_text"])[0].label == "dog"


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sft_sources.coco_captions(str(tmp_path / "bad.json"), str(tmp_path))
    (tmp_path / "wrong.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="lacks"):
        sft_sources.coco_captions(str(tmp_path / "wrong.json"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown format"):
        sft_sources.convert("laion", str(tmp_path / "x.jsonl"))


# -- fuzzing the converters (issue 26) ----------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cm3leon_jax.data import text as text_lib  # noqa: E402

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20)
junk = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | any_text,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                    max_leaves=6)
numbers = st.one_of(st.integers(-50, 250), st.floats(-50, 250), st.sampled_from([float("nan"), float("inf")]),
                    st.just("12"), st.none())
# every reason an annotation / question can be skipped for
ANNOTATION_REASONS = {"malformed annotation", "unknown image id", "empty text", "missing image",
                      "image outside the image dir", "caption is not a string", "caption is not UTF-8 text",
                      "crowd box", "image without a valid size", "malformed box", "box with a non-positive size",
                      "box outside the crop", "malformed question", "no annotation", "question is not a string",
                      "question is not UTF-8 text", "answer is not a string", "answer is not UTF-8 text"}


@st.composite
def coco(draw):
    """A COCO-style file: good and malformed "images" entries (file names
    that escape the dir among them) and annotations of every shape."""
    images = []
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["good", "good", "junk", "escape", "no_file"]))
        if kind == "junk":
            images.append(draw(junk))
        else:
            name = {"good": f"{i}.jpg", "escape": "../../etc/passwd", "no_file": f"gone{i}.jpg"}[kind]
            images.append({"id": draw(st.sampled_from([i, str(i), float(i), None, "x"])), "file_name": name,
                           "width": draw(numbers), "height": draw(numbers)})
    anns = []
    for j in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            anns.append(draw(junk))
        else:
            anns.append({"id": j, "image_id": draw(st.sampled_from([0, 1, 2, 3, 9, "1", None, [1]])),
                         "caption": draw(st.one_of(any_text, junk)), "category_id": draw(st.sampled_from([1, 2, "x"])),
                         "iscrowd": draw(st.sampled_from([0, 1, None])),
                         "bbox": draw(st.one_of(st.lists(numbers, min_size=4, max_size=4), junk))})
    cats = draw(st.lists(st.one_of(st.fixed_dictionaries({"id": st.sampled_from([1, 2]), "name": any_text}), junk),
                         max_size=3))
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp, data):
    os.makedirs(os.path.join(tmp, "img"), exist_ok=True)
    for i in range(4):
        _jpg(os.path.join(tmp, "img", f"{i}.jpg"), 12, 10)
    path = os.path.join(tmp, "ann.json")
    with open(path, "w") as f:
        json.dump(data, f)  # NaN and Infinity as JSON's common extension writes them
    return path


def _check_records(recs, tmp):
    img_dir = os.path.join(tmp, "img") + os.sep
    for r in recs:
        for k in ("input_image", "output_image"):
            assert r[k] is None or (r[k].startswith(img_dir) and os.path.isfile(r[k]))
        for k in ("instruction", "output_text"):
            if r[k] is not None:
                r[k].encode("utf-8")
                assert r[k].strip() and text_lib.clean_text(r[k]) == r[k]


def test_fuzz_coco_converters(record_property):
    import tempfile

    tried = [0]

    @FUZZ
    @given(coco())
    def run(data):
        tried[0] += 1
        with tempfile.TemporaryDirectory() as tmp:
            path = _write(tmp, data)
            recs, skipped = sft_sources.coco_captions(path, os.path.join(tmp, "img"))
            _check_records(recs, tmp)
            per_ann = sum(n for r, n in skipped.items() if r != "malformed image entry")
            assert len(recs) + per_ann == len(data["annotations"]), skipped  # each annotation once
            assert set(skipped) <= ANNOTATION_REASONS | {"malformed image entry"}, skipped
            recs, skipped = sft_sources.coco_detection(path, os.path.join(tmp, "img"))
            _check_records(recs, tmp)
            assert set(skipped) <= ANNOTATION_REASONS | {"malformed image entry"}, skipped
            for r in recs:
                for b in r["meta"]["boxes"]:
                    assert 0 <= b["x0"] < b["x1"] <= 1 and 0 <= b["y0"] < b["y1"] <= 1
                assert fmt.text_to_boxes(r["output_text"] or r["instruction"][len(sft_sources.SPATIAL_PREFIX):])
            # VQA over the same ids: questions of every shape
            qs = {"data_subtype": "x", "questions": [
                a if not isinstance(a, dict) else {"question_id": a.get("id"), "image_id": a.get("image_id"),
                                                   "question": a.get("caption")} for a in data["annotations"]]}
            ans = {"annotations": [{"question_id": j, "multiple_choice_answer": "yes"} for j in range(6)] + [None]}
            for name, obj in (("q.json", qs), ("a.json", ans)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f)
            recs, skipped = sft_sources.vqa(os.path.join(tmp, "q.json"), os.path.join(tmp, "a.json"), tmp)
            assert recs == [] or all(os.path.isfile(r["input_image"]) for r in recs)
            assert sum(n for r, n in skipped.items() if r != "malformed annotation") + len(recs) == len(qs["questions"])

    run()
    print(f"\nfuzz COCO captions / detection / VQA converters: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def test_fuzz_instructpix2pix(tmp_path_factory, record_property):
    import tempfile

    tried = [0]
    seeds_entries = st.one_of(junk, st.tuples(st.sampled_from(["d0", "d1", "../x", "/etc", "", 3]),
                                              st.lists(st.sampled_from([1, 2, "1", "x", None, 2.5]), max_size=3)
                                              ).map(list))

    @FUZZ
    @given(st.lists(seeds_entries, max_size=4),
           st.one_of(junk, st.fixed_dictionaries({"edit": st.one_of(any_text, junk)})))
    def run(seeds, prompt):
        tried[0] += 1
        with tempfile.TemporaryDirectory() as tmp:
            for d in ("d0", "d1"):
                os.makedirs(os.path.join(tmp, d))
                for s in (1, 2):
                    for k in (0, 1):
                        _jpg(os.path.join(tmp, d, f"{s}_{k}.jpg"), 10, 10)
            with open(os.path.join(tmp, "d0", "prompt.json"), "w") as f:
                json.dump(prompt, f)
            with open(os.path.join(tmp, "d1", "prompt.json"), "wb") as f:
                f.write(b"{not json")
            with open(os.path.join(tmp, "seeds.json"), "w") as f:
                json.dump(seeds, f)
            recs, skipped = sft_sources.instructpix2pix(tmp)
            for r in recs:
                assert os.path.dirname(r["input_image"]) == os.path.join(tmp, "d0")
                assert r["instruction"].strip() and text_lib.clean_text(r["instruction"]) == r["instruction"]

    run()
    print(f"\nfuzz InstructPix2Pix converter: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def test_malformed_records_by_hand(tmp_path):
    _jpg(str(tmp_path / "img" / "a.jpg"), w=200, h=100)
    inst = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                       {"id": 2, "file_name": "../../etc/passwd", "width": 10, "height": 10},
                       {"id": 3, "file_name": "a.jpg", "width": -5, "height": 100},
                       {"file_name": "a.jpg"}],
            "categories": [{"id": 3, "name": "dog\x00"}, "junk"],
            "annotations": [{"image_id": 1, "bbox": [60, 10, 40, 50], "category_id": 3},
                            {"image_id": 1, "bbox": [60, 10, -40, 50], "category_id": 3},     # negative width
                            {"image_id": 1, "bbox": [60, 10, float("nan"), 50], "category_id": 3},
                            {"image_id": 1, "bbox": [1, 2, 3], "category_id": 3},
                            {"image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 3},          # path escapes
                            {"image_id": 3, "bbox": [0, 0, 5, 5], "category_id": 3},          # negative size
                            {"image_id": "one", "bbox": [0, 0, 5, 5]}, 17]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    recs, skipped = sft_sources.coco_detection(str(tmp_path / "inst.json"), str(tmp_path / "img"))
    assert skipped == {"box with a non-positive size": 1, "malformed box": 2, "image outside the image dir": 2,
                       "image without a valid size": 1, "malformed annotation": 2, "malformed image entry": 1}
    assert [r["output_text"] for r in recs if r["task"] == fmt.DETECTION] == ["dog 3 3 15 19"]
    caps = {"images": inst["images"][:2], "annotations": [
        {"id": 1, "image_id": 1, "caption": "A dog \udcff\x07. "}, {"id": 2, "image_id": 1, "caption": ["a", "b"]},
        {"id": 3, "image_id": 2, "caption": "escapes"}]}
    (tmp_path / "cap.json").write_text(json.dumps(caps))
    recs, skipped = sft_sources.coco_captions(str(tmp_path / "cap.json"), str(tmp_path / "img"))
    assert [r["output_text"] for r in recs] == ["A dog \ufffd."]
    assert skipped == {"caption is not a string": 1, "image outside the image dir": 1}
