"""Fuzzing the document sources a user points `cm3leon prepare` at (issue 26:
nothing a user feeds in loses work). For each source the invariant is the
one prepare relies on: reading every document finishes; every good record
comes out once, with its text cleaned by the ingestion policy
(data/text.py); every bad one is counted once under its true reason (in
`.skipped` or as a `SkippedDocument`); and opening the source again gives
the same answer (so a rerun of prepare has nothing to add). Each test prints
how many examples it tried (pytest -s)."""
from __future__ import annotations

import atexit
import collections
import functools
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.sources import SkippedDocument, open_source

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_bombs import png_bomb  # noqa: E402

RES = 16
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["file", "caption", "x"]) | any_text,
                                                             inner, max_size=3),
    max_leaves=8)
IMAGE_REASONS = {"corrupt or truncated image", "too small", "too large", "missing file", "not a regular file",
                 "empty file", "truncated tar member"}


@functools.lru_cache(maxsize=None)
def _png(i: int, side: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (i * 40 % 256, 200, 7)).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _bomb() -> bytes:
    return png_bomb(20000, 20000)


def _drain(src):
    """What prepare sees: {id: text} of the records, and skips by reason."""
    records, skips = {}, collections.Counter(getattr(src, "skipped", {}))
    for i in range(len(src)):
        try:
            doc = src[i]
        except SkippedDocument as e:
            assert e.index == i
            skips[e.reason] += 1
            continue
        doc_id = int(doc["id"])
        assert doc_id not in records  # every record once
        if doc["image"] is not None:
            assert doc["image"].shape == (RES, RES, 3) and doc["image"].dtype == np.uint8
        if doc["text"] is not None:
            doc["text"].encode("utf-8")  # what the BPE, CLIP and msgpack need
            assert doc["text"].strip() and len(doc["text"]) <= text_lib.MAX_TEXT_CHARS
            assert text_lib.clean_text(doc["text"]) == doc["text"]
        records[doc_id] = (doc["text"], doc["image"] is not None)
    return records, skips


def _expect_caption(caption):
    """(cleaned caption or None, skip reason or None) under the policy."""
    try:
        return text_lib.clean_field(caption, "caption"), None
    except text_lib.BadText as e:
        return None, e.reason


# -- image folder -------------------------------------------------------------------

@st.composite
def folder_lines(draw):
    """(line bytes, expected) pairs; expected is ("record", text, has_image),
    ("skip", reason), or None for an arbitrary line (only counted)."""
    n = draw(st.integers(1, 8))
    lines = []
    for j in range(n):
        kind = draw(st.sampled_from(["good", "text_only", "json", "bytes", "non_string", "escape", "huge",
                                     "bad_image", "surrogate", "deep", "digits"]))
        good = f"img{j}.png"
        if kind in ("good", "text_only", "surrogate", "huge"):
            caption = {"good": draw(any_text), "text_only": draw(any_text), "surrogate": "abc \udcff",
                       "huge": "x" * 1_000_000}[kind]
            rec = {"caption": caption} if kind == "text_only" else {"file": good, "caption": caption}
            text, reason = _expect_caption(caption)
            has_image = kind != "text_only"
            if reason:
                exp = ("skip", reason)
            elif text is None and not has_image:
                exp = ("skip", "empty document (no file, no caption)")
            else:
                exp = ("record", text, has_image)
            lines.append((json.dumps(rec).encode(), exp, good))
        elif kind == "json":
            lines.append((json.dumps(draw(json_values)).encode(), None, None))
        elif kind == "bytes":
            lines.append((draw(st.binary(max_size=40)).replace(b"\n", b" "), None, None))
        elif kind == "non_string":
            value = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.text(max_size=3), max_size=2),
                                   st.booleans()))
            lines.append((json.dumps({"file": good, "caption": value}).encode(), ("skip", "caption is not a string"),
                          good))
        elif kind == "escape":
            name = draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", "a/../../x.png", "..", "."]))
            lines.append((json.dumps({"file": name, "caption": "x"}).encode(),
                          ("skip", "file outside the image folder"), None))
        elif kind == "bad_image":
            which = draw(st.sampled_from(["corrupt", "bomb", "missing", "dir", "tiny"]))
            reason = {"corrupt": "corrupt or truncated image", "bomb": "too large", "missing": "missing file",
                      "dir": "not a regular file", "tiny": "too small"}[which]
            lines.append((json.dumps({"file": f"{which}{j}.png", "caption": "a caption"}).encode(),
                          ("skip", reason), (which, f"{which}{j}.png")))
        elif kind == "deep":
            lines.append((b"[" * 100_000, ("skip", "captions.jsonl line is nested too deeply"), None))
        else:  # an integer over Python's 4300-digit limit: valid JSON, unreadable
            lines.append((b'{"caption": ' + b"9" * 5000 + b"}", ("skip", "captions.jsonl line is not JSON"), None))
    return lines


def _write_folder(d, lines):
    for _, _, extra in lines:
        if isinstance(extra, str):
            with open(os.path.join(d, extra), "wb") as f:
                f.write(_png(len(extra)))
        elif isinstance(extra, tuple):
            which, name = extra
            path = os.path.join(d, name)
            if which == "corrupt":
                with open(path, "wb") as f:
                    f.write(_png(1)[:30])
            elif which == "bomb":
                with open(path, "wb") as f:
                    f.write(_bomb())
            elif which == "dir":
                os.makedirs(path)
            elif which == "tiny":
                with open(path, "wb") as f:
                    f.write(_png(2, side=2))
    with open(os.path.join(d, "captions.jsonl"), "wb") as f:
        f.write(b"\n".join(line for line, _, _ in lines) + b"\n")


def test_fuzz_image_folder(record_property):
    tried = [0]

    @FUZZ
    @given(folder_lines())
    def run(lines):
        tried[0] += 1
        with tempfile.TemporaryDirectory() as d:
            _write_folder(d, lines)
            records, skips = _drain(open_source(f"image_folder:{d}", resolution=RES))
            assert (records, skips) == _drain(open_source(f"image_folder:{d}", resolution=RES))  # a rerun
        assert len(records) + sum(skips.values()) == len(lines)  # every line accounted for once
        known = collections.Counter()
        for line_no, (_, exp, _) in enumerate(lines):
            if exp is None:
                continue
            if exp[0] == "record":
                assert records[line_no] == (exp[1], exp[2])
            else:
                assert line_no not in records
                known[exp[1]] += 1
        assert all(skips[r] >= c for r, c in known.items()), (skips, known)

    run()
    print(f"\nfuzz image_folder: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


# -- webdataset -------------------------------------------------------------------

def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@st.composite
def shards(draw):
    """Tar members of img2dataset-style samples, some odd; and the expected
    outcome of the samples with plain keys: key -> ("record", text, has_image)
    or ("skip", reason)."""
    members, expected = [], {}
    for j in range(draw(st.integers(1, 6))):
        key = f"{j:05d}"
        kind = draw(st.sampled_from(["good", "junk_text", "text_only", "image_only", "bomb", "odd_names"]))
        if kind in ("good", "junk_text", "text_only"):
            data = (draw(st.binary(max_size=60)) if kind == "junk_text"
                    else draw(any_text).encode("utf-8", "surrogatepass"))  # surrogates as raw bytes too
            text, reason = _expect_caption(data)
            has_image = kind != "text_only"
            if has_image:
                members.append((f"{key}.png", _png(j)))
            members.append((f"{key}.txt", data))
            expected[key] = (("skip", reason) if reason else
                             ("skip", "sample without image or caption") if text is None and not has_image else
                             ("record", text, has_image))
        elif kind == "image_only":
            members.append((f"{key}.jpg", _png(j)))  # a PNG named .jpg: the bytes decide
            expected[key] = ("record", None, True)
        elif kind == "bomb":
            members += [(f"{key}.png", _bomb()), (f"{key}.txt", b"a caption")]
            expected[key] = ("skip", "too large")
        else:
            members.append((draw(st.sampled_from(["README", "dir/", "./x", "a b.c.TXT", "\u00e9t\u00e9.txt",
                                                   "k.ey.png", "__meta__.json", ".hidden"])),
                            draw(st.sampled_from([None, b"", b"hello"]))))
    return members, expected


def test_fuzz_webdataset(record_property):
    tried = [0]

    @FUZZ
    @given(shards(), st.one_of(st.none(), st.floats(0.0, 1.0)))
    def run(case, cut):
        tried[0] += 1
        members, expected = case
        data = _tar(members)
        if cut is not None:
            data = data[:int(len(data) * cut)]
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "00000.tar"), "wb") as f:
                f.write(data)
            try:
                src = open_source(f"webdataset:{d}/*.tar", resolution=RES)
            except ValueError as e:
                pytest.fail(f"opening a damaged shard must count it, not fail: {e}")
            records, skips = _drain(src)
            keys = src.keys()
            assert (records, skips) == _drain(open_source(f"webdataset:{d}/*.tar", resolution=RES))
        assert len(keys) == len(src)
        assert set(skips) <= IMAGE_REASONS | {"caption is not UTF-8 text", "sample without image or caption",
                                              "unreadable tar shard", "unreadable tail of a tar shard",
                                              "tar member without an extension"}, skips
        if cut is None:  # a whole tar: each plain sample as expected
            by_key = {k: i for i, k in enumerate(keys)}
            numbers = {k: int(src._samples[i][0]) for k, i in by_key.items()}
            for key, exp in expected.items():
                if exp[0] == "record":
                    assert records[numbers[key]] == (exp[1], exp[2])
                elif exp[1] != "sample without image or caption":
                    assert key in by_key and numbers[key] not in records and skips[exp[1]] >= 1

    run()
    print(f"\nfuzz webdataset: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


# -- TFDS ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tfds_source():
    """A real two-example TFDS dataset (ArrayRecord), built once."""
    import tensorflow_datasets as tfds

    d = tempfile.mkdtemp(prefix="cm3_tfds_fuzz_")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                           "caption": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="cm3_fuzz", version="1.0.0", features=features, data_dir=d, file_format="array_record",
        split_datasets={"train": [(i, {"image": np.full((12, 12, 3), 9 * i, np.uint8), "caption": f"doc {i}",
                                       "label": i}) for i in range(2)]}, disable_shuffling=True)
    return d


def test_tfds_real_dataset_reads_undecoded_and_wrong_typed_caption_is_counted():
    d = _tfds_source()
    src = open_source(f"tfds:cm3_fuzz?data_dir={d}", resolution=RES)
    assert src._decoders is not None  # the Image feature is decoded by load_image, under the budget
    assert [src[i]["text"] for i in range(2)] == ["doc 0", "doc 1"]
    np.testing.assert_array_equal(src[1]["image"], np.full((RES, RES, 3), 9, np.uint8))
    wrong = open_source(f"tfds:cm3_fuzz?data_dir={d}&caption=label", resolution=RES)
    records, skips = _drain(wrong)
    assert records == {} and skips == {"caption is not a string": 2}
    with pytest.raises(ValueError, match="no caption feature 'nope'"):
        open_source(f"tfds:cm3_fuzz?data_dir={d}&caption=nope")


pixel_arrays = st.one_of(
    st.tuples(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
              st.sampled_from([(12, 12), (12, 12, 1), (12, 12, 2), (12, 12, 3), (12, 12, 4), (12, 12, 5), (3, 12, 3),
                               (12,), (2, 2, 2, 2), (0, 12, 3)])).map(lambda t: np.ones(t[1], t[0])),
    st.sampled_from([b"", b"\x89PNG junk"]) | st.binary(max_size=30),
    st.just("a string"), st.integers())


def test_fuzz_tfds_examples(record_property):
    """TFDS examples with missing or wrong-typed features (what another
    dataset's schema gives), fed to a real source's reader."""
    src, tried = open_source(f"tfds:cm3_fuzz?data_dir={_tfds_source()}", resolution=RES), [0]

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(["image", "caption"]),
                           st.one_of(pixel_arrays, st.none(), any_text, st.binary(max_size=20),
                                     st.lists(any_text, max_size=2), st.integers(), st.floats())))
    def run(example):
        tried[0] += 1
        src._random, src._block = None, (0, [example, example])
        try:
            doc = src[0]
        except SkippedDocument as e:
            assert e.reason in IMAGE_REASONS | {"caption is not a string", "caption is not UTF-8 text",
                                                "image is not an array of pixels"}, e
            return
        caption = example.get("caption")
        if isinstance(caption, (list, np.ndarray)):  # a sequence of captions: the first
            flat = np.asarray(caption, dtype=object).reshape(-1)
            caption = flat[0] if flat.size else None
        assert doc["text"] == text_lib.clean_field(caption)
        assert doc["image"] is None or doc["image"].shape == (RES, RES, 3)

    run()
    print(f"\nfuzz tfds examples: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])
