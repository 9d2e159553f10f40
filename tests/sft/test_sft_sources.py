"""Each real-data converter turns a small fixture (written here, in the
dataset's own layout) into the expected instruction records, and skips
(counting) a record naming a missing image."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import sft_sources
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
