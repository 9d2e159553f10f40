"""Decompression bombs for tests: valid PNGs of a solid colour and any size,
written row by row through zlib so that neither the writer nor the file
ever holds the decoded image (a 20000 x 20000 one is about 50 KB)."""
from __future__ import annotations

import struct
import zlib

_COLOUR_TYPES = {"1": (0, 1, 1), "L": (0, 8, 8), "RGB": (2, 8, 24), "RGBA": (6, 8, 32)}  # type, depth, bits


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, mode: str = "1") -> bytes:
    """A PNG of `width` x `height` zero pixels in `mode` ("1", "L", "RGB",
    "RGBA"), every byte of it valid."""
    colour_type, depth, bits = _COLOUR_TYPES[mode]
    row = b"\0" + bytes((width * bits + 7) // 8)  # filter byte + the pixels
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def gif_bomb(width: int, height: int) -> bytes:
    """A 16 x 16 GIF from Pillow with its screen and frame sizes rewritten to
    `width` x `height`: what a bomb's header says (its data is short, so
    only a reader that trusts the header before decoding survives it)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (16, 16)).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    size = struct.pack("<HH", width, height)
    data[6:10] = size  # logical screen
    desc = data.index(b"\x2c", 13)  # the image descriptor: 2c, left, top, width, height
    data[desc + 5:desc + 9] = size
    return bytes(data)
