"""Corpus sources beyond `sources.py`'s: webdataset tar shards and TFDS
datasets, speaking the same random-access document-source protocol
(`len(src)`, `src[i] -> {"id", "text", "image"}`, `SkippedDocument` for a
document that cannot be used). `sources.open_source` returns them for the
specs `webdataset:GLOB` and `tfds:NAME[@SPLIT][?OPTIONS]`; `cm3leon prepare`
(data/prepare.py) and `cm3leon embed` read them.
"""
from __future__ import annotations

import glob
import os
import sys
import tarfile
import threading
import urllib.parse
from typing import Dict, List, Optional, Tuple

import numpy as np

from cm3leon_jax.data import images as images_lib
from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.documents import SkippedDocument, check_index


WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXT = "txt"


def _expand_shards(pattern: str) -> List[str]:
    """Tar files of a webdataset spec: a directory (its *.tar), a glob, and
    webdataset's brace notation (`shard-{00000..00099}.tar`), sorted."""
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(pattern, "*.tar")))
    import braceexpand  # webdataset's own dependency, for its shard notation

    files = set()
    for p in braceexpand.braceexpand(pattern):
        files.update(f for f in glob.glob(p) if os.path.isfile(f))
    return sorted(files)


class WebDatasetSource:
    """img2dataset-style webdataset tar shards: a sample is the run of tar
    members sharing a key (webdataset's `__key__`, split off the name by
    `webdataset.tariterators.base_plus_ext`, suffixes lower-cased, `__meta__`
    files ignored, exactly as `webdataset.WebDataset` groups them), with an
    image (.jpg/.jpeg/.png/.webp) and/or a caption (.txt, UTF-8, cleaned by
    `data.text.clean_field`: undecodable bytes -> U+FFFD, mostly
    undecodable -> skipped as "caption is not UTF-8 text"; only its first
    `4 x MAX_TEXT_CHARS` bytes are read).

    Random access: the tars are indexed at open time by reading their
    headers only (Python's tarfile seeks over the members' data), keeping
    each member's data offset; `source[i]` then reads two members by offset.
    Tars must be uncompressed (what img2dataset writes). The id of a sample
    is its number in (sorted tar path, order within the tar); samples with
    neither an image nor a caption, and unreadable tars (or the unreadable
    tail of a truncated one), are counted in `.skipped` by reason; regular
    members whose name is not KEY.EXT are counted as "tar member without an
    extension". A member cut short by the end of the file raises
    `SkippedDocument` ("truncated tar member") when read."""

    def __init__(self, pattern: str, resolution: int = 256, max_pixels: int = images_lib.MAX_PIXELS):
        from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

        if not pattern:
            raise ValueError("bad source spec 'webdataset:': expected webdataset:GLOB (tar shards)")
        self.pattern, self.resolution, self.max_pixels = pattern, int(resolution), int(max_pixels)
        self.spec = f"webdataset:{pattern}"
        self.files = _expand_shards(pattern)
        if not self.files:
            raise ValueError(f"webdataset source {pattern!r}: no tar shards match (give a directory of "
                             "*.tar files, a glob such as /data/*.tar, or shard-{00000..00009}.tar)")
        self.skipped: Dict[str, int] = {}
        # per sample: (id, tar number, key, image member or None, text member or None);
        # a member is (extension, data offset, size)
        self._samples: List[tuple] = []
        self._handles: Dict[int, object] = {}
        self._lock = threading.Lock()
        number = 0
        for t, path in enumerate(self.files):
            current, members = None, {}
            try:
                tar = tarfile.open(path, mode="r:")
            except (tarfile.TarError, OSError) as e:
                self._skip("unreadable tar shard")
                print(f"warning: {path}: not a readable uncompressed tar ({type(e).__name__}: {e}); skipped",
                      file=sys.stderr)
                continue
            groups = []
            try:
                with tar:
                    for info in tar:
                        name = info.name
                        if not info.isreg() or not name:
                            continue
                        base = os.path.basename(name)
                        if base.startswith(meta_prefix) and base.endswith(meta_suffix):
                            continue
                        key, ext = base_plus_ext(name)
                        if key is None:
                            self._skip("tar member without an extension")
                            continue
                        ext = ext.lower()
                        if key != current:
                            if current is not None:
                                groups.append((current, members))
                            current, members = key, {}
                        members.setdefault(ext, (info.offset_data, info.size))
            except (tarfile.TarError, OSError) as e:
                self._skip("unreadable tail of a tar shard")
                print(f"warning: {path}: unreadable after {len(groups)} samples ({type(e).__name__}: {e})",
                      file=sys.stderr)
                current = None  # the sample being read when it failed may be incomplete
            if current is not None:
                groups.append((current, members))
            for key, members in groups:
                image = next(((e, *members[e]) for e in WDS_IMAGE_EXTS if e in members), None)
                text = (WDS_TEXT_EXT, *members[WDS_TEXT_EXT]) if WDS_TEXT_EXT in members else None
                if image is None and text is None:
                    self._skip("sample without image or caption")
                else:
                    self._samples.append((number, t, key, image, text))
                number += 1

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __len__(self) -> int:
        return len(self._samples)

    def keys(self) -> List[str]:
        """`__key__` of every document, in index order."""
        return [s[2] for s in self._samples]

    def _read(self, t: int, offset: int, size: int, index: int, where: str) -> bytes:
        with self._lock:
            f = self._handles.get(t)
            if f is None:
                f = self._handles[t] = open(self.files[t], "rb")
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise SkippedDocument(index, "truncated tar member", f"{where}: {len(data)} of {size} bytes")
        return data

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self._samples))
        number, t, key, image_m, text_m = self._samples[index]
        where = f"{self.files[t]}:{key}"
        text = image = None
        if text_m is not None:
            size = min(text_m[2], 4 * text_lib.MAX_TEXT_CHARS)  # the rest would be cut anyway
            data = self._read(t, text_m[1], size, index, f"{where}.txt")
            try:
                text = text_lib.clean_field(data, "caption")
            except text_lib.BadText as e:
                raise SkippedDocument(index, e.reason, f"{where}.txt: {e}") from None
        if image_m is not None:
            name = f"{where}.{image_m[0]}"
            try:
                if image_m[2] > images_lib.max_file_bytes(self.max_pixels):
                    raise images_lib.BadImageError(name, "too large", f"{image_m[2]} bytes")
                image = images_lib.load_image(self._read(t, image_m[1], image_m[2], index, name), self.resolution,
                                              name=name, max_pixels=self.max_pixels)
            except images_lib.BadImageError as e:
                raise SkippedDocument(index, e.reason, str(e)) from None
        return {"id": np.int64(number), "text": text, "image": image}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


TFDS_CAPTION_FEATURES = ("caption", "captions/text", "text", "captions")
TFDS_BLOCK = 256


def _parse_tfds_spec(rest: str) -> dict:
    """`NAME[@SPLIT][?data_dir=DIR&image=FEATURE&caption=FEATURE]`; NAME is
    TFDS's own (`coco_captions/2017:1.1.0`)."""
    body, _, query = rest.partition("?")
    name, _, split = body.partition("@")
    if not name:
        raise ValueError(f"bad source spec 'tfds:{rest}': expected tfds:NAME[@SPLIT][?data_dir=DIR&"
                         "image=FEATURE&caption=FEATURE]")
    opts = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(opts) - {"data_dir", "image", "caption"})
    if unknown:
        raise ValueError(f"bad source spec 'tfds:{rest}': unknown option(s) {unknown} (known: data_dir, "
                         "image, caption)")
    return {"name": name, "split": split or "train", "data_dir": opts.get("data_dir") or None,
            "image_feature": opts.get("image") or "image", "caption_feature": opts.get("caption") or None}


def _get_path(example: dict, path: str):
    value = example
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _feature_paths(features, prefix: str = "") -> List[str]:
    out = []
    for k, v in (features.items() if hasattr(features, "items") else []):
        path = f"{prefix}{k}"
        out.append(path)
        inner = getattr(v, "feature", v)  # Sequence(FeaturesDict) -> its dict
        if hasattr(inner, "items"):
            out.extend(_feature_paths(inner, path + "/"))
    return out


class TfdsSource:
    """A TFDS image-caption dataset already prepared on this machine (never
    downloaded: a missing dataset is an error naming where it was looked
    for). The document id is the example's position in the split; "image"
    is the image feature, "caption" the first of `caption`, `captions/text`,
    `text`, `captions` present (or `?caption=PATH`), the first string of a
    sequence of captions. Random access through `as_data_source` when the
    dataset is stored as ArrayRecord, otherwise by blocks of 256 examples
    read with split slicing (`train[a:b]`) and cached, so a shard's
    sequential reads cost one slice read per block.

    A top-level `tfds.features.Image` is read undecoded and decoded by
    `images.load_image`, so the pixel budget `max_pixels` refuses a bomb
    before it is decoded; an image feature of another kind (a uint8 / uint16
    / float tensor) is taken as pixels (2-D, or 3-D with 1 to 4 channels;
    anything else is skipped as "image is not an array of pixels"). A
    caption that is not text is skipped as "caption is not a string"."""

    def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
                 image_feature: str = "image", caption_feature: Optional[str] = None, resolution: int = 256,
                 spec: Optional[str] = None, max_pixels: int = images_lib.MAX_PIXELS):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        self.resolution, self.max_pixels = int(resolution), int(max_pixels)
        self.spec = spec or f"tfds:{name}@{split}"
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends, named
            raise ValueError(f"TFDS dataset {name!r} not found ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]})") from None
        if not builder.is_prepared():
            raise ValueError(f"TFDS dataset {name!r} is not prepared in {where} (looked for {builder.data_dir}); "
                             "`cm3leon prepare` never downloads: build it there first (`tfds build "
                             f"{name} --data_dir=DIR`) and pass tfds:{name}?data_dir=DIR")
        self.builder = builder
        splits = builder.info.splits
        if split not in splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (it has {sorted(splits)})")
        paths = _feature_paths(builder.info.features)
        if image_feature not in paths:
            raise ValueError(f"TFDS dataset {name!r} has no image feature {image_feature!r} (features: "
                             f"{paths}); pass tfds:{name}?image=FEATURE")
        if caption_feature is None:
            caption_feature = next((c for c in TFDS_CAPTION_FEATURES if c in paths), None)
            if caption_feature is None:
                raise ValueError(f"TFDS dataset {name!r} has none of the caption features "
                                 f"{list(TFDS_CAPTION_FEATURES)} (features: {paths}); pass "
                                 f"tfds:{name}?caption=FEATURE")
        elif caption_feature not in paths:
            raise ValueError(f"TFDS dataset {name!r} has no caption feature {caption_feature!r} "
                             f"(features: {paths})")
        self.image_feature, self.caption_feature = image_feature, caption_feature
        self.num = int(splits[split].num_examples)
        self.skipped: Dict[str, int] = {}
        self._decoders = None
        top = builder.info.features
        if "/" not in image_feature and isinstance(top[image_feature], tfds.features.Image):
            self._decoders = {image_feature: tfds.decode.SkipDecoding()}  # encoded bytes: load_image decodes
        self._random = None
        try:
            self._random = builder.as_data_source(split=split, decoders=self._decoders)
        except Exception:  # noqa: BLE001 - stored as tfrecord: block reads instead
            self._random = None
        self._block: Tuple[int, list] = (-1, [])

    def __len__(self) -> int:
        return self.num

    def _example(self, index: int) -> dict:
        if self._random is not None:
            return self._random[index]
        start = index - index % TFDS_BLOCK
        if self._block[0] != start:
            import tensorflow_datasets as tfds

            stop = min(start + TFDS_BLOCK, self.num)
            ds = self.builder.as_dataset(split=f"{self.split}[{start}:{stop}]", shuffle_files=False,
                                         decoders=self._decoders)
            self._block = (start, list(tfds.as_numpy(ds)))
        return self._block[1][index - start]

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, self.num)
        ex = self._example(index)
        text = _get_path(ex, self.caption_feature)
        if isinstance(text, (list, tuple, np.ndarray)) and not isinstance(text, (str, bytes)):
            text = next((t for t in list(np.asarray(text, dtype=object).reshape(-1))), None)
        try:
            text = text_lib.clean_field(text, "caption")
        except text_lib.BadText as e:
            raise SkippedDocument(index, e.reason, f"{self.spec}[{index}]: {e}") from None
        pixels = _get_path(ex, self.image_feature)
        image = None
        if pixels is not None:
            name = f"{self.spec}[{index}]"
            try:
                if isinstance(pixels, bytes):  # an undecoded Image feature
                    image = images_lib.load_image(pixels, self.resolution, name=name, max_pixels=self.max_pixels)
                else:
                    image = _pixels_to_image(pixels, self.resolution, name, self.max_pixels)
            except images_lib.BadImageError as e:
                raise SkippedDocument(index, e.reason, str(e)) from None
        return {"id": np.int64(index), "text": text, "image": image}


def _pixels_to_image(pixels, resolution: int, name: str, max_pixels: int) -> np.ndarray:
    """A decoded image tensor (2-D, or 3-D with 1-4 channels; uint8, wider
    integers scaled by their range, floats in [0, 1] or [0, 255]) ->
    uint8 [resolution, resolution, 3]."""
    from PIL import Image

    a = np.asarray(pixels)
    if a.dtype.kind not in "biuf" or a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[-1] <= 4):
        raise images_lib.BadImageError(name, "image is not an array of pixels", f"{a.dtype} {a.shape}")
    h, w = a.shape[:2]
    if h * w > max_pixels:
        raise images_lib.BadImageError(name, "too large", f"{w}x{h}, over the budget of {max_pixels} pixels")
    if min(h, w) < images_lib.MIN_SIDE:
        raise images_lib.BadImageError(name, "too small", f"{w}x{h}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype.kind == "b":
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float32))
        a = np.clip(a * (255.0 if a.size and a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        top = 65535 if a.max() > 255 else 255
        a = ((np.clip(a, 0, top).astype(np.int64) * 510 + top) // (2 * top)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(images_lib.resize_center_crop(images_lib._to_rgb(img), resolution), np.uint8)


def _sizes(resolution: Optional[int], max_pixels: Optional[int]) -> dict:
    return {**({} if resolution is None else {"resolution": int(resolution)}),
            **({} if max_pixels is None else {"max_pixels": int(max_pixels)})}


def open_webdataset(rest: str, resolution: Optional[int] = None, max_pixels: Optional[int] = None
                    ) -> WebDatasetSource:
    return WebDatasetSource(rest, **_sizes(resolution, max_pixels))


def open_tfds(rest: str, resolution: Optional[int] = None, max_pixels: Optional[int] = None) -> TfdsSource:
    opts = _parse_tfds_spec(rest)
    return TfdsSource(**opts, spec=f"tfds:{rest}", **_sizes(resolution, max_pixels))
