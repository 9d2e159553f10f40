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

Bad records are skipped and counted by reason, never fatal: an image file
that is missing ("missing image") or named outside its dir ("image outside
the image dir"); text that is empty after cleaning ("empty text") or not
text ("instruction is not a string", "caption is not UTF-8 text", ...; all
text goes through `data.text.clean_field`); an entry of the wrong shape
("malformed annotation", "malformed image entry", "malformed question",
"malformed seeds entry"); a box that is not four finite numbers ("malformed
box"), has a width or height <= 0 ("box with a non-positive size"), lies in
an image without a positive width and height ("image without a valid
size"), or is cut off by the crop ("box outside the crop"). A file that is
not JSON, or JSON of another shape (no "annotations" list, ...), is a
ValueError naming it. Each converter returns (records, Counter of skips);
`convert(...)` writes them to a JSONL with paths relative to it where
possible.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
import os
from typing import Dict, Iterator, List, Optional, Tuple

from cm3leon_jax.data import text as text_lib
from cm3leon_jax.sft import format as fmt

CAPTION_INSTRUCTION = "describe the image"
DETECT_INSTRUCTION = "detect the objects"
SPATIAL_PREFIX = "draw: "
FORMATS = ("instructpix2pix", "coco_captions", "vqa", "coco_detection")


class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
        raise ValueError(f"{what} {path!r} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _need_keys(obj, keys, what: str):
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise ValueError(f"{what} lacks {[k for k in keys if not isinstance(obj, dict) or k not in obj]}: is it "
                         "the right file?")
    for k in keys:
        if not isinstance(obj[k], list):
            raise ValueError(f"{what}: {k!r} is a {type(obj[k]).__name__}, not a list: is it the right file?")


def _int(value, reason: str) -> int:
    """An integer id (an int, or a string of digits), else `_Skip(reason)`."""
    if isinstance(value, bool):
        raise _Skip(reason)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 30:
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Skip(reason)


def _text(value, what: str) -> Optional[str]:
    try:
        text = text_lib.clean_field(value, what)
    except text_lib.BadText as e:
        raise _Skip(e.reason) from None
    return text.strip() if text is not None else None


def _loose_text(value) -> Optional[str]:
    """Text kept as metadata only: cleaned, or None when it is not text."""
    try:
        return text_lib.clean_field(value, "text")
    except text_lib.BadText:
        return None


def _inside(base: str, name, malformed: str = "malformed image entry",
            outside: str = "image outside the image dir") -> str:
    """`base/name`, or `_Skip` when `name` is not a relative path below
    `base` (never opened: `../..` and absolute paths come from bad data)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise _Skip(malformed)
    try:
        os.fsencode(name)
    except UnicodeError:
        raise _Skip(malformed) from None
    base = os.path.abspath(base)
    full = os.path.normpath(os.path.join(base, name))
    if os.path.isabs(name) or not full.startswith(base.rstrip(os.sep) + os.sep):
        raise _Skip(outside)
    return full


def instructpix2pix(src: str) -> Tuple[List[dict], collections.Counter]:
    seeds = _load_json(os.path.join(src, "seeds.json"), "InstructPix2Pix seeds file")
    if not isinstance(seeds, list):
        raise ValueError(f"InstructPix2Pix seeds file {os.path.join(src, 'seeds.json')!r} is a "
                         f"{type(seeds).__name__}, not a list of [prompt_dir, [seed, ...]]: is it the right file?")
    out, skipped = [], collections.Counter()
    for entry in seeds:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            skipped["malformed seeds entry"] += 1
            continue
        prompt_dir, seed_list = entry
        try:
            d = _inside(src, prompt_dir, "malformed seeds entry", "prompt dir outside the dataset")
        except _Skip as e:
            skipped[e.reason] += max(1, len(seed_list))
            continue
        path = os.path.join(d, "prompt.json")
        if not os.path.isfile(path):
            skipped["missing prompt.json"] += len(seed_list)
            continue
        try:
            prompt = _load_json(path, "prompt file")
            if not isinstance(prompt, dict):
                raise ValueError("not an object")
            edit = _text(prompt.get("edit"), "instruction")
        except ValueError:
            skipped["prompt.json is not a JSON object"] += len(seed_list)
            continue
        except _Skip as e:
            skipped[e.reason] += len(seed_list)
            continue
        for seed in seed_list:
            try:
                seed = _int(seed, "malformed seed")
            except _Skip as e:
                skipped[e.reason] += 1
                continue
            a, b = os.path.join(d, f"{seed}_0.jpg"), os.path.join(d, f"{seed}_1.jpg")
            if not edit:
                skipped["empty text"] += 1
            elif not (os.path.isfile(a) and os.path.isfile(b)):
                skipped["missing image"] += 1
            else:
                out.append({"id": f"ip2p-{prompt_dir}-{seed}", "task": fmt.EDITING, "instruction": edit,
                            "input_image": a, "output_image": b, "output_text": None,
                            "meta": {"input_caption": _loose_text(prompt.get("input")),
                                     "output_caption": _loose_text(prompt.get("output"))}})
    return out, skipped


def _annotation_image(ann, by_id: Dict[int, dict]) -> tuple:
    """(image id, image entry) of a COCO annotation; `_Skip` naming what is
    wrong with it otherwise."""
    if not isinstance(ann, dict):
        raise _Skip("malformed annotation")
    image_id = _int(ann.get("image_id"), "malformed annotation")
    im = by_id.get(image_id)
    if im is None:
        raise _Skip("unknown image id")
    return image_id, im


def _images_by_id(data: dict, skipped: collections.Counter) -> Dict[int, dict]:
    """COCO "images" by id; an entry without an integer id or a file name is
    counted ("malformed image entry") and left out."""
    by_id = {}
    for im in data.get("images", []):
        try:
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
                raise _Skip("malformed image entry")
            by_id[_int(im.get("id"), "malformed image entry")] = im
        except _Skip as e:
            skipped[e.reason] += 1
    return by_id


def coco_captions(annotations: str, images: str) -> Tuple[List[dict], collections.Counter]:
    data = _load_json(annotations, "COCO captions file")
    _need_keys(data, ("images", "annotations"), f"COCO captions file {annotations!r}")
    skipped = collections.Counter()
    by_id = _images_by_id(data, skipped)
    out = []
    for ann in data["annotations"]:
        try:
            image_id, im = _annotation_image(ann, by_id)
            caption = _text(ann.get("caption"), "caption")
            if not caption:
                raise _Skip("empty text")
            path = _inside(images, im["file_name"])
            if not os.path.isfile(path):
                raise _Skip("missing image")
        except _Skip as e:
            skipped[e.reason] += 1
            continue
        ann_id = ann.get("id")
        out.append({"id": f"coco-cap-{ann_id if isinstance(ann_id, (int, str)) else len(out)}",
                    "task": fmt.CAPTIONING, "instruction": CAPTION_INSTRUCTION, "input_image": path,
                    "output_image": None, "output_text": caption, "meta": {"image_id": image_id}})
    return out, skipped


def vqa(questions: str, annotations: str, images: str) -> Tuple[List[dict], collections.Counter]:
    q = _load_json(questions, "VQA questions file")
    a = _load_json(annotations, "VQA annotations file")
    _need_keys(q, ("questions",), f"VQA questions file {questions!r}")
    _need_keys(a, ("annotations",), f"VQA annotations file {annotations!r}")
    subtype = q.get("data_subtype") or a.get("data_subtype")
    if not isinstance(subtype, str) or not subtype.isprintable() or "/" in subtype:
        raise ValueError(f"VQA questions file {questions!r} has no usable \"data_subtype\" (e.g. \"train2014\", "
                         f"got {subtype!r}): it names the COCO image files")
    out, skipped = [], collections.Counter()
    answers = {}
    for x in a["annotations"]:
        try:
            if not isinstance(x, dict):
                raise _Skip("malformed annotation")
            answers[_int(x.get("question_id"), "malformed annotation")] = x
        except _Skip as e:
            skipped[e.reason] += 1
    for item in q["questions"]:
        try:
            if not isinstance(item, dict):
                raise _Skip("malformed question")
            qid = _int(item.get("question_id"), "malformed question")
            image_id = _int(item.get("image_id"), "malformed question")
            ann = answers.get(qid)
            if ann is None:
                raise _Skip("no annotation")
            question = _text(item.get("question"), "question")
            answer = _text(ann.get("multiple_choice_answer"), "answer")
            if not question or not answer:
                raise _Skip("empty text")
            path = os.path.join(images, f"COCO_{subtype}_{image_id:012d}.jpg")
            if not os.path.isfile(path):
                raise _Skip("missing image")
        except _Skip as e:
            skipped[e.reason] += 1
            continue
        alts = ann.get("answers") if isinstance(ann.get("answers"), list) else []
        out.append({"id": f"vqa-{qid}", "task": fmt.VQA, "instruction": question,
                    "input_image": path, "output_image": None, "output_text": answer,
                    "meta": {"question_id": qid, "answer": answer,
                             "answers": [_loose_text(x.get("answer")) for x in alts if isinstance(x, dict)]}})
    return out, skipped


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def coco_detection(annotations: str, images: str, tasks=(fmt.DETECTION, fmt.SPATIAL),
                   num_bins: int = fmt.NUM_BINS) -> Tuple[List[dict], collections.Counter]:
    data = _load_json(annotations, "COCO instances file")
    _need_keys(data, ("images", "annotations", "categories"), f"COCO instances file {annotations!r}")
    names = {}
    for c in data["categories"]:
        try:
            label = _text(c.get("name"), "category name") if isinstance(c, dict) else None
            if label:
                names[_int(c.get("id"), "malformed category")] = label
        except _Skip:
            pass  # its boxes are labelled "object"
    boxes: Dict[int, list] = collections.defaultdict(list)
    skipped = collections.Counter()
    by_id = _images_by_id(data, skipped)
    for ann in data["annotations"]:
        try:
            image_id, im = _annotation_image(ann, by_id)
            if ann.get("iscrowd"):
                raise _Skip("crowd box")
            width, height = _number(im.get("width")), _number(im.get("height"))
            if width is None or height is None or width <= 0 or height <= 0:
                raise _Skip("image without a valid size")
            bbox = ann.get("bbox")
            xywh = [_number(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else [None]
            if any(v is None for v in xywh):
                raise _Skip("malformed box")
            if xywh[2] <= 0 or xywh[3] <= 0:
                raise _Skip("box with a non-positive size")
            try:
                category = _int(ann.get("category_id"), "")
            except _Skip:
                category = None
            box = fmt.crop_box(xywh, width, height, names.get(category, "object"))
            if box is None:
                raise _Skip("box outside the crop")
        except _Skip as e:
            skipped[e.reason] += 1
            continue
        boxes[image_id].append(box)
    out = []
    for image_id, im in sorted(by_id.items()):
        if not boxes.get(image_id):
            continue
        try:
            path = _inside(images, im["file_name"])
        except _Skip as e:
            skipped[e.reason] += len(tasks)
            continue
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
