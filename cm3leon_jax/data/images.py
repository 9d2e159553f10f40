"""Image input policy for the tokenizer and the data pipeline.

RGBA / greyscale / palette / 16-bit images become 8-bit RGB (transparent
pixels composited on white); non-square images are resized so the short side
fits, then centre-cropped. A corrupt, truncated, empty or degenerate file
raises `BadImageError` naming the file; callers that loop over corpora catch
it, count the skip by reason and go on.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MIN_SIDE = 8  # smaller images carry no usable content at any of our resolutions


class BadImageError(ValueError):
    """An image that cannot be used; `.reason` is a short category for skip counts."""

    def __init__(self, source: str, reason: str, detail: str = ""):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}{': ' + detail if detail else ''}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the type's range
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(source: Union[str, bytes, os.PathLike], resolution: int, name: str = None) -> np.ndarray:
    """Reads a file path or encoded bytes -> uint8 [resolution, resolution, 3]."""
    label = name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source))
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise BadImageError(label, "empty file")
            fh = io.BytesIO(source)
        else:
            if not os.path.exists(source):
                raise BadImageError(label, "missing file")
            if os.path.getsize(source) == 0:
                raise BadImageError(label, "empty file")
            fh = open(source, "rb")
        with fh:
            img = Image.open(fh)
            img.load()  # decodes fully: truncation surfaces here
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(label, "corrupt or truncated image", f"{type(e).__name__}: {e}") from None
    if min(img.size) < MIN_SIDE:
        raise BadImageError(label, "too small", f"{img.size[0]}x{img.size[1]} < {MIN_SIDE} pixels")
    img = resize_center_crop(_to_rgb(img), resolution)
    return np.asarray(img, dtype=np.uint8)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the VQ-GAN's input range)."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def from_model_range(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clipped."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
