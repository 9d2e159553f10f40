"""Random-access document sources: what the memory bank is built from.

A *document* is one image-text pair of a corpus, either half possibly absent
(CM3Leon's memory bank holds multimodal and single-modality documents and
prefers the former; PAPER.md, "Retrieval augmentation"). A source is anything
with

    len(source)             number of documents (skipped ones included)
    source[i]               {"id": int64 document id, "text": str | None,
                             "image": uint8 [H, W, 3] | None}

and may raise `SkippedDocument` for a document that cannot be used (a
corrupt image, a record with neither text nor image); consumers count those
by `.reason` and go on. Ids are stable: they do not change when another
document is skipped, so a neighbour table built today still names the same
documents after a corrupt file is fixed.

`open_source(spec)` reads the spec syntax `cm3leon prepare --source=` takes:
`shapes:N[:SEED]`, `image_folder:PATH`, `webdataset:GLOB`, `tfds:NAME` (the
last two live in `cm3leon_jax.data.corpus_sources`), and `prepared:DIR`, the
prepared ArrayRecord dataset (`cm3leon_jax.data.prepare`), which speaks the
same protocol.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from cm3leon_jax.data import images as images_lib
from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.documents import DocumentSource, SkippedDocument, check_index  # noqa: F401

CAPTIONS_FILE = "captions.jsonl"
MAX_LINE_BYTES = 16 * 2**20  # a captions.jsonl line longer than this is skipped unread
SPEC_KINDS = ("shapes", "image_folder", "webdataset", "tfds", "prepared")
SPEC_HELP = ("shapes:N (N procedurally generated shapes documents, optionally shapes:N:SEED), "
             "image_folder:PATH (images + captions.jsonl), webdataset:GLOB (tar shards), "
             "tfds:NAME[@SPLIT][?data_dir=DIR] (a locally prepared TFDS dataset), "
             "prepared:DIR (a `cm3leon prepare` output)")


class ShapesSource:
    """Documents 0 .. num-1 of the procedural shapes stream `seed`: every
    document has its image and its caption; the id is the stream index."""

    def __init__(self, num: int, seed: int = 0, resolution: int = 64):
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
            raise ValueError(f"shapes source: the number of documents must be an integer >= 0, got {num!r}")
        if seed < 0:
            raise ValueError(f"shapes source: seed must be >= 0, got {seed}")
        self.num, self.seed, self.resolution = int(num), int(seed), int(resolution)
        self.spec = f"shapes:{self.num}:{self.seed}"
        self.skipped: Dict[str, int] = {}

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        from cm3leon_jax.data import shapes

        index = check_index(index, self.num)
        ex = shapes.generate_example(self.seed, index, self.resolution)
        return {"id": np.int64(index), "text": ex.caption, "image": ex.image}


class ImageFolderSource:
    """A folder with `captions.jsonl`, one JSON object a line:
    `{"file": "00000.png", "caption": "..."}` (the layout
    `data.shapes_corpus.write_corpus` writes). The document id is the record's
    0-based line number. A missing or empty "file" makes a text-only
    document, a missing or empty "caption" an image-only one.

    Captions go through `data.text.clean_field` (lone surrogates -> U+FFFD,
    control characters removed, cut at 64 Ki characters). Lines that are
    blank, not JSON objects, over 16 MiB, hold a caption that is not a
    string (or not text), or name a file outside the folder (`..`, an
    absolute path; never opened) are counted in `.skipped` by reason and
    never become documents. A symbolic link inside the folder is followed:
    the folder's owner put it there. Images that fail to decode, or exceed
    the pixel budget `max_pixels` (`images.load_image`), raise
    `SkippedDocument` when read (decoding every image up front would cost as
    much as the job itself)."""

    def __init__(self, path: str, resolution: int = 256, max_pixels: int = images_lib.MAX_PIXELS):
        self.path = os.path.abspath(path)
        self.resolution, self.max_pixels = int(resolution), int(max_pixels)
        self.spec = f"image_folder:{path}"
        if not os.path.isdir(path):
            raise ValueError(f"image folder {path!r} does not exist or is not a directory")
        captions = os.path.join(path, CAPTIONS_FILE)
        if not os.path.isfile(captions):
            raise ValueError(f"image folder {path!r} has no {CAPTIONS_FILE} (one JSON object a line: "
                             '{"file": "00000.png", "caption": "..."})')
        self.skipped: Dict[str, int] = {}
        self._records: List[tuple] = []  # (line number, file or None, caption or None)
        for line_no, line in enumerate(_bounded_lines(captions, MAX_LINE_BYTES)):
            # Undecodable bytes stay as lone surrogates (surrogateescape): in a file
            # name they are the bytes of the name on disk; in a caption
            # text.clean_field replaces them and skips a caption made of them.
            rec = (f"captions.jsonl line over {MAX_LINE_BYTES // 2**20} MiB" if line is None
                   else self._parse(line.decode("utf-8", errors="surrogateescape")))
            if isinstance(rec, str):
                self.skipped[rec] = self.skipped.get(rec, 0) + 1
            else:
                self._records.append((line_no, *rec))

    def _parse(self, line: str):
        """(file, caption) or the reason the line is skipped."""
        if not line.strip():
            return "blank line in captions.jsonl"
        try:
            rec = json.loads(line)
        except RecursionError:
            return "captions.jsonl line is nested too deeply"
        except ValueError:  # JSONDecodeError, and integers over Python's digit limit
            return "captions.jsonl line is not JSON"
        if not isinstance(rec, dict):
            return "captions.jsonl line is not a JSON object"
        file = rec.get("file")
        if file is not None and not isinstance(file, str):
            return "file name is not a string"
        try:
            caption = text_lib.clean_field(rec.get("caption"), "caption")
        except text_lib.BadText as e:
            return e.reason
        file = file or None
        if file is not None:
            reason = _unsafe_name(self.path, file)
            if reason:
                return reason
        if file is None and caption is None:
            return "empty document (no file, no caption)"
        return file, caption

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self._records))
        line_no, file, caption = self._records[index]
        image = None
        if file is not None:
            try:
                image = images_lib.load_image(os.path.join(self.path, file), self.resolution, name=file,
                                              max_pixels=self.max_pixels)
            except images_lib.BadImageError as e:
                raise SkippedDocument(index, e.reason, str(e)) from None
        return {"id": np.int64(line_no), "text": caption, "image": image}


def _bounded_lines(path: str, limit: int):
    """The lines of a file as bytes (newline dropped), None for a line over
    `limit` bytes, which is skipped without being held in memory."""
    with open(path, "rb") as f:
        while True:
            line = f.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drain the rest of the line
                    line = f.readline(2**20)
                yield None
                continue
            yield line.rstrip(b"\n")


def _unsafe_name(folder: str, file: str) -> Optional[str]:
    """Why `file` may not be read as a path below `folder`, or None."""
    try:
        os.fsencode(file)  # a name made of undecodable bytes is fine; other lone surrogates are not
    except UnicodeError:
        return "file name is not a valid path"
    if "\0" in file:
        return "file name is not a valid path"
    full = os.path.normpath(os.path.join(folder, file))
    if os.path.isabs(file) or not full.startswith(folder.rstrip(os.sep) + os.sep):
        return "file outside the image folder"
    return None


def open_source(spec: str, resolution: Optional[int] = None, max_pixels: Optional[int] = None):
    """The document source a spec names (see the module docstring).
    `resolution` overrides the source's image side (shapes: 64, image
    folders: 256); `max_pixels` the image size budget of the sources that
    decode files (`images.MAX_PIXELS` by default)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"unknown source spec {spec!r}: expected one of {SPEC_HELP}")
    kind, _, rest = spec.partition(":")
    extra = {} if resolution is None else {"resolution": int(resolution)}
    budget = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    if kind == "shapes":
        parts = rest.split(":")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad source spec {spec!r}: expected shapes:N or shapes:N:SEED with "
                             "non-negative integers")
        num = int(parts[0])
        if num == 0:
            raise ValueError(f"source {spec!r} has no documents: give shapes:N with N >= 1")
        return ShapesSource(num, int(parts[1]) if len(parts) == 2 else 0, **extra)
    if kind == "image_folder":
        if not rest:
            raise ValueError(f"bad source spec {spec!r}: expected image_folder:PATH")
        return ImageFolderSource(rest, **extra, **budget)
    if kind in ("webdataset", "tfds", "prepared"):  # implemented with data preparation
        if kind == "prepared":
            from cm3leon_jax.data import prepared

            return prepared.open_prepared(rest)
        from cm3leon_jax.data import corpus_sources

        return (corpus_sources.open_webdataset if kind == "webdataset" else corpus_sources.open_tfds)(
            rest, resolution, max_pixels)
    raise ValueError(f"unknown source kind {kind!r} in {spec!r}: expected one of {SPEC_HELP}")
