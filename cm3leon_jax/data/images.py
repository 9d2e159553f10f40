"""Image input policy for the tokenizer and the data pipeline.

RGBA / greyscale / palette / 16-bit / CMYK images become 8-bit RGB
(transparent pixels composited on white); a JPEG's EXIF orientation is
applied (the picture as a viewer shows it, which is what its caption
describes); non-square images are resized so the short side fits, then
centre-cropped. An animated image gives its first frame.

Size policy: an image over `max_pixels` (width x height; `MAX_PIXELS` =
8192 x 8192 by default, `cm3leon prepare --max_image_pixels`) is refused as
"too large" from its header, before a pixel is decoded, so a decompression
bomb (a few KB of PNG that decodes to gigabytes) costs nothing; the memory
of decoding and converting an accepted image is a small multiple of
`max_pixels` (the decoded image and two or three converted copies),
whatever the input. Pillow's own limit (2 x `PIL.Image.MAX_IMAGE_PIXELS`,
179M pixels) still refuses anything above it, whatever `max_pixels` says.
Only the formats scrapers meet are identified (`FORMATS`): Pillow's exotic
plugins are never run on untrusted bytes.

A corrupt, truncated, empty, degenerate or oversized file raises
`BadImageError` naming the file; callers that loop over corpora catch it,
count the skip by reason and go on.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Truncated files must fail, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MIN_SIDE = 8  # smaller images carry no usable content at any of our resolutions
MAX_PIXELS = 8192 * 8192  # 67M pixels: above any photo a scraper keeps, 256 MB decoded as RGBA
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
BYTES_PER_PIXEL_BOUND = 8  # the widest mode decoded (16-bit RGBA)


class BadImageError(ValueError):
    """An image that cannot be used; `.reason` is a short category for skip counts."""

    def __init__(self, source: str, reason: str, detail: str = ""):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}{': ' + detail if detail else ''}")


def max_file_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The largest encoded file accepted under a pixel budget (an
    uncompressed 16-bit RGBA image of `max_pixels`, plus 1 MiB of headers and
    metadata): a bigger file cannot hold an acceptable image, so it is
    refused before it is read."""
    return BYTES_PER_PIXEL_BOUND * int(max_pixels) + 2**20


def _scale_to_8_bits(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> "L" by the type's range, in
    integer arithmetic (no float64 copy of a large image)."""
    a = np.asarray(img)
    if img.mode == "F":
        top = 255.0 if a.size and float(np.nanmax(a)) > 1.0 else 1.0
        out = np.clip(np.nan_to_num(a.astype(np.float32) / top * 255.0 + 0.5), 0, 255)
        return Image.fromarray(out.astype(np.uint8), "L")
    top = 65535 if img.mode.startswith("I;16") or (a.size and int(a.max()) > 255) else 255
    a = np.clip(a, 0, top).astype(np.uint32)
    # round(a / top * 255) exactly: (2 * 255 a + top) // (2 top), in place (< 2^25: no overflow)
    a *= 510
    a += top
    a //= 2 * top
    return Image.fromarray(a.astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_to_8_bits(img)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _header_size(fh) -> str:
    """"WxH" read from the header alone, for an image Pillow refused as a
    decompression bomb before we could look (its limit is below ours)."""
    for fmt in FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None:
            continue
        try:
            fh.seek(0)
            if accept and not accept(fh.read(16)):
                continue
            fh.seek(0)
            w, h = factory(fh, "").size
            return f"{w}x{h}"
        except Exception:  # noqa: BLE001 - a header Pillow cannot read: say what is known
            continue
    return f"over Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(source: Union[str, bytes, os.PathLike], resolution: int, name: str = None,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Reads a file path or encoded bytes -> uint8 [resolution, resolution, 3].

    Raises BadImageError (naming `name`, or the path) with reason "missing
    file", "not a regular file", "unreadable file", "empty file", "too large"
    (over `max_pixels`, or a file too big to hold an image within it), "too
    small" or "corrupt or truncated image"."""
    label = name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source))
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < MIN_SIDE ** 2:
        raise ValueError(f"max_pixels must be an integer >= {MIN_SIDE ** 2}, got {max_pixels!r}")
    size_limit = max_file_bytes(max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImageError(label, "empty file")
        if len(source) > size_limit:
            raise BadImageError(label, "too large", f"{len(source)} bytes (the limit for {max_pixels} pixels is "
                                f"{size_limit})")
        fh = io.BytesIO(source)
    else:
        if not os.path.exists(source):
            raise BadImageError(label, "missing file")
        if not os.path.isfile(source):
            raise BadImageError(label, "not a regular file")
        nbytes = os.path.getsize(source)
        if nbytes == 0:
            raise BadImageError(label, "empty file")
        if nbytes > size_limit:
            raise BadImageError(label, "too large", f"{nbytes} bytes (the limit for {max_pixels} pixels is "
                                f"{size_limit})")
        try:
            fh = open(source, "rb")
        except OSError as e:
            raise BadImageError(label, "unreadable file", f"{type(e).__name__}: {e}") from None
    with fh:
        try:
            img = Image.open(fh, formats=FORMATS)  # the header only
        except Image.DecompressionBombError:
            raise BadImageError(label, "too large", f"{_header_size(fh)}, over the budget of {max_pixels} "
                                "pixels") from None
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, and what plugins raise on junk
            raise BadImageError(label, "corrupt or truncated image", f"{type(e).__name__}: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise BadImageError(label, "too large", f"{w}x{h}, over the budget of {max_pixels} pixels")
        if min(w, h) < MIN_SIDE:
            raise BadImageError(label, "too small", f"{w}x{h} < {MIN_SIDE} pixels")
        try:
            img.load()  # decodes fully: truncation surfaces here
            # Pillow's decoders raise a zoo of types on corrupt data (OSError,
            # SyntaxError, ValueError, EOFError, struct.error, IndexError, ...)
            img = _oriented(img)
            img = _to_rgb(img)
        except Exception as e:  # noqa: BLE001 - see above; each is this file's fault, not ours
            raise BadImageError(label, "corrupt or truncated image", f"{type(e).__name__}: {e}") from None
    img = resize_center_crop(img, resolution)
    return np.asarray(img, dtype=np.uint8)


def _oriented(img: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says to show it (unchanged when it
    has none, or EXIF too damaged to read)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image without orientation
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are still good
        pass
    return img


def read_rgb(path: str) -> np.ndarray:
    """A trusted image file (one this project wrote: samples, reconstructions)
    as uint8 RGB at its own size; inputs from users go through `load_image`."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)
