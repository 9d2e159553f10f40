"""Converters from the instruction datasets users hold to instruction records
(sft/records.py), to be prepared with `cm3leon sft prepare`.

    instructpix2pix  the released InstructPix2Pix data: DIR/seeds.json
                     ([[prompt_dir, [seed, ...]], ...]), DIR/PROMPT_DIR/
                     prompt.json ({"input": caption, "edit": instruction,
                     "output": edited caption}) and PROMPT_DIR/SEED_0.jpg (the
                     input image), SEED_1.jpg (the edited one) -> editing
    coco_captions    COCO captions JSON (captions_train2014.json: "images",
                     "annotations" with "caption") + the image dir ->
                     captioning, one record per caption
    vqa              VQA v2 questions JSON ("questions", "data_subtype") +
                     annotations JSON ("annotations" with
                     "multiple_choice_answer", "answers") + the COCO image dir
                     (COCO_<subtype>_<image_id:012d>.jpg) -> vqa
    coco_detection   COCO instances JSON ("images", "annotations" with "bbox"
                     [x, y, w, h] and "category_id", "categories") + the image
                     dir -> detection (image -> boxes as text) and spatially
                     grounded generation (boxes as text -> image)

Boxes are mapped into the centre-cropped square the data pipeline makes of
each image (`sft.format.crop_box`, from the JSON's width/height), clipped,
and written as text (`sft.format.boxes_to_text`); crowd annotations and
boxes entirely cut off are left out.

A record whose image file is missing is skipped and counted ("missing
image"); so is one with an empty caption, question or answer ("empty
text"). Each converter returns (records, Counter of skips); `convert(...)`
writes them to a JSONL with paths relative to it where possible.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Dict, Iterator, List, Tuple

from cm3leon_jax.sft import format as fmt

CAPTION_INSTRUCTION = "describe the image"
DETECT_INSTRUCTION = "detect the objects"
SPATIAL_PREFIX = "draw: "
FORMATS = ("instructpix2pix", "coco_captions", "vqa", "coco_detection")


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e})") from None


def _need_keys(obj, keys, what: str):
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise ValueError(f"{what} lacks {[k for k in keys if not isinstance(obj, dict) or k not in obj]}: is it "
                         "the right file?")


def instructpix2pix(src: str) -> Tuple[List[dict], collections.Counter]:
    seeds = _load_json(os.path.join(src, "seeds.json"), "InstructPix2Pix seeds file")
    out, skipped = [], collections.Counter()
    for entry in seeds:
        prompt_dir, seed_list = entry[0], entry[1]
        d = os.path.join(src, prompt_dir)
        try:
            prompt = _load_json(os.path.join(d, "prompt.json"), "prompt file")
        except ValueError:
            skipped["missing prompt.json"] += len(seed_list)
            continue
        edit = str(prompt.get("edit", "")).strip()
        for seed in seed_list:
            a, b = os.path.join(d, f"{seed}_0.jpg"), os.path.join(d, f"{seed}_1.jpg")
            if not edit:
                skipped["empty text"] += 1
            elif not (os.path.isfile(a) and os.path.isfile(b)):
                skipped["missing image"] += 1
            else:
                out.append({"id": f"ip2p-{prompt_dir}-{seed}", "task": fmt.EDITING, "instruction": edit,
                            "input_image": a, "output_image": b, "output_text": None,
                            "meta": {"input_caption": prompt.get("input"), "output_caption": prompt.get("output")}})
    return out, skipped


def _images_by_id(data: dict) -> Dict[int, dict]:
    return {int(im["id"]): im for im in data.get("images", [])}


def coco_captions(annotations: str, images: str) -> Tuple[List[dict], collections.Counter]:
    data = _load_json(annotations, "COCO captions file")
    _need_keys(data, ("images", "annotations"), f"COCO captions file {annotations!r}")
    by_id = _images_by_id(data)
    out, skipped = [], collections.Counter()
    for ann in data["annotations"]:
        im = by_id.get(int(ann["image_id"]))
        caption = str(ann.get("caption", "")).strip()
        if im is None:
            skipped["unknown image id"] += 1
        elif not caption:
            skipped["empty text"] += 1
        elif not os.path.isfile(os.path.join(images, im["file_name"])):
            skipped["missing image"] += 1
        else:
            out.append({"id": f"coco-cap-{ann.get('id', len(out))}", "task": fmt.CAPTIONING,
                        "instruction": CAPTION_INSTRUCTION, "input_image": os.path.join(images, im["file_name"]),
                        "output_image": None, "output_text": caption,
                        "meta": {"image_id": int(ann["image_id"])}})
    return out, skipped


def vqa(questions: str, annotations: str, images: str) -> Tuple[List[dict], collections.Counter]:
    q = _load_json(questions, "VQA questions file")
    a = _load_json(annotations, "VQA annotations file")
    _need_keys(q, ("questions",), f"VQA questions file {questions!r}")
    _need_keys(a, ("annotations",), f"VQA annotations file {annotations!r}")
    subtype = q.get("data_subtype") or a.get("data_subtype")
    answers = {int(x["question_id"]): x for x in a["annotations"]}
    out, skipped = [], collections.Counter()
    for item in q["questions"]:
        ann = answers.get(int(item["question_id"]))
        question = str(item.get("question", "")).strip()
        answer = str(ann.get("multiple_choice_answer", "")).strip() if ann else ""
        name = f"COCO_{subtype}_{int(item['image_id']):012d}.jpg"
        path = os.path.join(images, name)
        if ann is None:
            skipped["no annotation"] += 1
        elif not question or not answer:
            skipped["empty text"] += 1
        elif not os.path.isfile(path):
            skipped["missing image"] += 1
        else:
            out.append({"id": f"vqa-{item['question_id']}", "task": fmt.VQA, "instruction": question,
                        "input_image": path, "output_image": None, "output_text": answer,
                        "meta": {"question_id": int(item["question_id"]), "answer": answer,
                                 "answers": [x.get("answer") for x in ann.get("answers", [])]}})
    return out, skipped


def coco_detection(annotations: str, images: str, tasks=(fmt.DETECTION, fmt.SPATIAL),
                   num_bins: int = fmt.NUM_BINS) -> Tuple[List[dict], collections.Counter]:
    data = _load_json(annotations, "COCO instances file")
    _need_keys(data, ("images", "annotations", "categories"), f"COCO instances file {annotations!r}")
    names = {int(c["id"]): c["name"] for c in data["categories"]}
    boxes: Dict[int, list] = collections.defaultdict(list)
    skipped = collections.Counter()
    by_id = _images_by_id(data)
    for ann in data["annotations"]:
        im = by_id.get(int(ann["image_id"]))
        if im is None:
            skipped["unknown image id"] += 1
            continue
        if ann.get("iscrowd"):
            skipped["crowd box"] += 1
            continue
        box = fmt.crop_box(ann["bbox"], im["width"], im["height"], names.get(int(ann["category_id"]), "object"))
        if box is None:
            skipped["box outside the crop"] += 1
        else:
            boxes[int(ann["image_id"])].append(box)
    out = []
    for image_id, im in sorted(by_id.items()):
        if not boxes.get(image_id):
            continue
        path = os.path.join(images, im["file_name"])
        if not os.path.isfile(path):
            skipped["missing image"] += len(tasks)
            continue
        text = fmt.boxes_to_text(boxes[image_id], num_bins)
        meta = {"image_id": image_id, "boxes": [dataclasses.asdict(b) for b in boxes[image_id]]}
        if fmt.DETECTION in tasks:
            out.append({"id": f"coco-det-{image_id}", "task": fmt.DETECTION, "instruction": DETECT_INSTRUCTION,
                        "input_image": path, "output_image": None, "output_text": text, "meta": meta})
        if fmt.SPATIAL in tasks:
            out.append({"id": f"coco-spatial-{image_id}", "task": fmt.SPATIAL, "instruction": SPATIAL_PREFIX + text,
                        "input_image": None, "output_image": path, "output_text": None, "meta": meta})
    return out, skipped


def convert(fmt_name: str, out_path: str, **kwargs) -> dict:
    """Runs one converter and writes its records to `out_path` (JSONL, image
    paths relative to it when below its dir); returns counts and skips."""
    from cm3leon_jax.sft import records as rec_lib

    fn = {"instructpix2pix": instructpix2pix, "coco_captions": coco_captions, "vqa": vqa,
          "coco_detection": coco_detection}.get(fmt_name)
    if fn is None:
        raise ValueError(f"unknown format {fmt_name!r}; the converters are {', '.join(FORMATS)}")
    recs, skipped = fn(**kwargs)
    base = os.path.dirname(os.path.abspath(out_path))

    def rel(p):
        if not p:
            return p
        p = os.path.abspath(p)
        return os.path.relpath(p, base) if p.startswith(base + os.sep) else p

    def fix(r: dict) -> Iterator[dict]:
        return dict(r, input_image=rel(r["input_image"]), output_image=rel(r["output_image"]))

    n = rec_lib.write_jsonl((fix(r) for r in recs), out_path)
    by_task = collections.Counter(r["task"] for r in recs)
    return {"out": os.path.abspath(out_path), "records": n, "by_task": dict(by_task), "skipped": dict(skipped)}
