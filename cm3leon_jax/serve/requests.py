"""What a client may ask the server for, checked before any work: each bad
field is a RequestError naming it, its value and the allowed range, which the
API answers with HTTP 4xx (the page shows the same message)."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
from typing import Any, Dict, Optional

import numpy as np

DECODINGS = ("top_p", "cd_k", "mixed", "greedy")
MAX_PROMPT_CHARS = 2000      # a caption-sized model; a longer prompt is a mistake, not a request
MAX_SAMPLES = 16
MAX_RETRIEVED = 4
MAX_UPLOAD_BYTES = 8 << 20   # an image upload (decoded from base64), 8 MiB
MAX_TEXT_TOKENS = 256


class RequestError(ValueError):
    """A request the server refuses: `status` is its HTTP code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Decoding:
    """The sampler's settings a request may change (`cm3leon generate`'s
    decoding flags, with its defaults)."""
    decoding: str = "mixed"
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cd_alpha: float = 0.1
    cd_k: int = 1

    def settings(self, image_cfg_scale: Optional[float] = None):
        from cm3leon_jax.sampling.sampler import SamplingSettings

        extra = {} if image_cfg_scale is None else {"image_cfg_scale": image_cfg_scale}
        return SamplingSettings(self.decoding, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                cfg_scale=self.cfg_scale, cd_alpha=self.cd_alpha, cd_k=self.cd_k, **extra)

    def flags(self) -> list:
        return [f"--decoding={self.decoding}", f"--cfg_scale={self.cfg_scale:g}",
                f"--temperature={self.temperature:g}", f"--top_p={self.top_p:g}"] + \
            ([f"--top_k={self.top_k}"] if self.top_k else []) + \
            ([f"--cd_alpha={self.cd_alpha:g}", f"--cd_k={self.cd_k}"]
             if self.decoding in ("cd_k", "mixed") and (self.cd_alpha, self.cd_k) != (0.1, 1) else [])


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    num_samples: int = 4
    num_retrieved: int = 0
    seed: int = 0
    decoding: Decoding = Decoding()


@dataclasses.dataclass(frozen=True)
class DescribeRequest:
    image: np.ndarray            # uint8 [H, W, 3] at the VQ-GAN's resolution
    prompt: str = ""
    seed: int = 0
    max_tokens: int = 64
    decoding: Decoding = Decoding(decoding="greedy", cfg_scale=1.0)


@dataclasses.dataclass(frozen=True)
class EditRequest:
    image: np.ndarray
    prompt: str
    num_samples: int = 4
    seed: int = 0
    image_cfg_scale: float = 1.5
    decoding: Decoding = Decoding(decoding="top_p", cfg_scale=7.5)


def _number(body: Dict[str, Any], name: str, default, lo, hi, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not float(value).is_integer()) or not math.isfinite(float(value)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    value = int(value) if integer else float(value)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def text(value, name: str, required: bool, what: str = "the text to generate an image for") -> str:
    """A prompt: a string, cleaned by the ingestion policy, within MAX_PROMPT_CHARS."""
    from cm3leon_jax.data import text as text_lib

    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"{name} has {len(value):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted", 413)
    try:
        value = text_lib.strict_text(value, name).strip()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if required and not value:
        raise RequestError(f"{name} is empty: give {what}")
    return value


def decoding(body: Dict[str, Any], defaults: Decoding = Decoding()) -> Decoding:
    name = body.get("decoding", defaults.decoding)
    if name not in DECODINGS:
        raise RequestError(f"decoding must be one of {', '.join(DECODINGS)}, got {name!r}")
    return Decoding(decoding=name,
                    cfg_scale=_number(body, "cfg_scale", defaults.cfg_scale, 1.0, 30.0),
                    temperature=_number(body, "temperature", defaults.temperature, 0.0, 5.0, lo_open=True),
                    top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, lo_open=True),
                    top_k=_number(body, "top_k", defaults.top_k, 0, 100_000, integer=True),
                    cd_alpha=_number(body, "cd_alpha", defaults.cd_alpha, 0.0, 1.0),
                    cd_k=_number(body, "cd_k", defaults.cd_k, 1, 100_000, integer=True))


def _object(body) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", 400)
    return body


def _known(body: Dict[str, Any], allowed) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}")


_DECODING_FIELDS = ("decoding", "cfg_scale", "temperature", "top_p", "top_k", "cd_alpha", "cd_k")


def generate_request(body, max_retrieved: int) -> GenerateRequest:
    body = _object(body)
    _known(body, ("prompt", "num_samples", "num_retrieved", "seed") + _DECODING_FIELDS)
    return GenerateRequest(prompt=text(body.get("prompt"), "prompt", required=True),
                           num_samples=_number(body, "num_samples", 4, 1, MAX_SAMPLES, integer=True),
                           num_retrieved=_number(body, "num_retrieved", 0, 0, max_retrieved, integer=True),
                           seed=_number(body, "seed", 0, 0, 2 ** 31 - 1 - MAX_SAMPLES, integer=True),
                           decoding=decoding(body))


def image_bytes(value, name: str = "image") -> bytes:
    """The bytes of a base64 image field (a data: URL prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{name} must be a base64-encoded PNG or JPEG string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > MAX_UPLOAD_BYTES * 4 // 3 + 8:
        raise RequestError(f"{name} is over the upload limit of {MAX_UPLOAD_BYTES >> 20} MiB", 413)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} is not valid base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{name} is over the upload limit of {MAX_UPLOAD_BYTES >> 20} MiB", 413)
    return data


def decode_image(data: bytes, resolution: int, name: str = "image") -> np.ndarray:
    """Uploaded bytes -> uint8 [resolution, resolution, 3], by the ingestion
    path's rules (pixel budget, formats); RequestError naming the reason."""
    from cm3leon_jax.data import images as images_lib

    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{name} is over the upload limit of {MAX_UPLOAD_BYTES >> 20} MiB", 413)
    try:
        return images_lib.load_image(data, resolution, name=name)
    except (ValueError, OSError) as e:
        raise RequestError(f"not a readable image: {e}", 400) from None


def describe_request(body, resolution: int) -> DescribeRequest:
    body = _object(body)
    _known(body, ("image", "prompt", "seed", "max_tokens") + _DECODING_FIELDS)
    image = decode_image(image_bytes(body.get("image")), resolution)
    return DescribeRequest(image=image, prompt=text(body.get("prompt"), "prompt", required=False),
                           seed=_number(body, "seed", 0, 0, 2 ** 31 - 1, integer=True),
                           max_tokens=_number(body, "max_tokens", 64, 1, MAX_TEXT_TOKENS, integer=True),
                           decoding=decoding(body, DescribeRequest.decoding))


def edit_request(body, resolution: int) -> EditRequest:
    body = _object(body)
    _known(body, ("image", "prompt", "num_samples", "seed", "image_cfg_scale") + _DECODING_FIELDS)
    image = decode_image(image_bytes(body.get("image")), resolution)
    return EditRequest(image=image, prompt=text(body.get("prompt"), "prompt", required=True,
                                                what="the instruction, e.g. 'make the circle green'"),
                       num_samples=_number(body, "num_samples", 4, 1, MAX_SAMPLES, integer=True),
                       seed=_number(body, "seed", 0, 0, 2 ** 31 - 1 - MAX_SAMPLES, integer=True),
                       image_cfg_scale=_number(body, "image_cfg_scale", 1.5, 1.0, 30.0),
                       decoding=decoding(body, EditRequest.decoding))


def png_base64(image: np.ndarray) -> str:
    """A uint8 image as base64 PNG bytes, saved exactly as `cm3leon generate` saves its files."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
