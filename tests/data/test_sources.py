"""Document sources: the shapes stream and an image folder against what was
written, every malformed record counted by reason, spec parsing errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import sources
from cm3leon_jax.data.sources import ImageFolderSource, ShapesSource, SkippedDocument, open_source
from cm3leon_jax.data import shapes
from cm3leon_jax.data import shapes_corpus


def test_shapes_source_is_the_shapes_stream():
    src = ShapesSource(5, seed=3, resolution=32)
    assert len(src) == 5 and isinstance(src, sources.DocumentSource)
    for i in (0, 4):
        doc, ex = src[i], shapes.generate_example(3, i, 32)
        assert doc["id"] == i and doc["id"].dtype == np.int64
        assert doc["text"] == ex.caption
        np.testing.assert_array_equal(doc["image"], ex.image)
        assert doc["image"].shape == (32, 32, 3) and doc["image"].dtype == np.uint8
    with pytest.raises(IndexError, match="5 out of range"):
        src[5]


def test_open_source_specs():
    a = open_source("shapes:4")
    assert isinstance(a, ShapesSource) and (len(a), a.seed, a.resolution) == (4, 0, 64)
    b = open_source("shapes:4:7", resolution=16)
    assert (b.seed, b.resolution, b.spec) == (7, 16, "shapes:4:7")
    assert b[2]["text"] == shapes.generate_example(7, 2).caption


@pytest.mark.parametrize("spec, match", [
    ("foo:1", "unknown source kind 'foo'"),
    ("shapes", "unknown source spec 'shapes'"),
    ("shapes:x", "bad source spec 'shapes:x'"),
    ("shapes:3:1:2", "bad source spec"),
    ("shapes:0", "has no documents"),
    ("image_folder:", "expected image_folder:PATH"),
    ("image_folder:/no/such/dir", "'/no/such/dir' does not exist"),
    ("webdataset:/no/such/*.tar", "no tar shards match"),
    ("tfds:", "expected tfds:NAME"),
    ("prepared:/no/such/dir", "does not exist"),
])
def test_bad_specs_name_themselves(spec, match):
    with pytest.raises(ValueError, match=match):
        open_source(spec)


def test_image_folder_records_and_skips(tmp_path):
    d = tmp_path / "folder"
    shapes_corpus.write_corpus(str(d), seed=1, num=3, resolution=32)  # lines 0-2: good image + caption
    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(d / "rgba.png")  # non-square, alpha
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (d / "00000.png").read_bytes()
    (d / "truncated.png").write_bytes(good[:len(good) // 2])
    extra = [
        json.dumps({"file": "rgba.png", "caption": ""}),            # 3: image only ("" = no text)
        json.dumps({"caption": "a caption without an image"}),      # 4: text only
        "",                                                          # 5: blank -> skipped
        "{not json",                                                 # 6: skipped
        json.dumps(["a", "list"]),                                   # 7: skipped
        json.dumps({"file": "", "caption": "  "}),                   # 8: empty document, skipped
        json.dumps({"file": "../escape.png", "caption": "x"}),       # 9: outside, skipped
        json.dumps({"file": "corrupt.png", "caption": "bad"}),       # 10: SkippedDocument on read
        json.dumps({"file": "truncated.png", "caption": "cut"}),     # 11: SkippedDocument on read
        json.dumps({"file": "missing.png", "caption": "gone"}),      # 12: SkippedDocument on read
        json.dumps({"file": 3, "caption": "x"}),                     # 13: skipped
    ]
    with open(d / "captions.jsonl", "a") as f:
        f.write("\n".join(extra) + "\n")
    src = open_source(f"image_folder:{d}", resolution=32)
    assert isinstance(src, ImageFolderSource)
    assert src.skipped == {"blank line in captions.jsonl": 1, "captions.jsonl line is not JSON": 1,
                           "captions.jsonl line is not a JSON object": 1,
                           "empty document (no file, no caption)": 1, "file outside the image folder": 1,
                           "file name is not a string": 1}
    assert len(src) == 8
    ex = shapes.generate_example(1, 1, 32)
    doc = src[1]
    assert doc["id"] == 1 and doc["text"] == ex.caption
    np.testing.assert_array_equal(doc["image"], ex.image)  # PNG round trip is lossless
    rgba = src[3]
    assert rgba["id"] == 3 and rgba["text"] is None and rgba["image"].shape == (32, 32, 3)
    # transparent red on white: composited, no alpha left
    np.testing.assert_array_equal(rgba["image"][16, 16], [255, 127, 127])
    text_only = src[4]
    assert text_only["id"] == 4 and text_only["image"] is None and text_only["text"].startswith("a caption")
    errors = []
    for i in range(5, 8):
        with pytest.raises(SkippedDocument) as e:
            src[i]
        errors.append(e.value)
    assert [e.reason for e in errors] == ["corrupt or truncated image", "corrupt or truncated image",
                                          "missing file"]
    assert [e.index for e in errors] == [5, 6, 7]
    for e, name in zip(errors, ("corrupt.png", "truncated.png", "missing.png")):
        assert name in str(e)  # the message names the file


def test_image_folder_without_captions_file(tmp_path):
    with pytest.raises(ValueError, match="has no captions.jsonl"):
        ImageFolderSource(str(tmp_path))


def test_image_folder_bytes_that_are_not_utf8(tmp_path):
    """A Latin-1 caption keeps its good characters (the bad byte -> U+FFFD);
    a caption of binary junk is skipped; a Latin-1 file name names the file
    whose name is those bytes."""
    png = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(png)
    os.rename(png, os.fsencode(str(tmp_path)) + b"/caf\xe9.png")
    (tmp_path / "captions.jsonl").write_bytes(
        b'{"file": "caf\xe9.png", "caption": "un caf\xe9 au lait"}\n'
        b'{"caption": "\xff\xfe\xfd\xfc\xfb"}\n')
    src = open_source(f"image_folder:{tmp_path}", resolution=16)
    assert len(src) == 1 and src.skipped == {"caption is not UTF-8 text": 1}
    doc = src[0]
    assert doc["text"] == "un caf\ufffd au lait" and tuple(doc["image"][0, 0]) == (1, 2, 3)
