"""Image input policy: modes, cropping, and bad files named in errors; the
pixel budget (bombs refused from their header), every kind of image a
scraper meets, and fuzzed bytes (issue 26)."""
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data.images import BadImageError, load_image
from cm3leon_jax.models.pixels import from_model_range, to_model_range


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((10, 10), (0, 0, 255, 255))
    out = load_image(_png_bytes(rgba), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[10, 10]) == (0, 0, 255)
    grey = load_image(_png_bytes(Image.new("L", (16, 16), 100)), 16)
    assert tuple(grey[3, 3]) == (100, 100, 100)
    pal = Image.new("P", (16, 16))
    pal.putpalette([0, 200, 0] + [0] * 765)
    assert tuple(load_image(_png_bytes(pal), 16)[0, 0]) == (0, 200, 0)


def test_16_bit_png_scaled_to_8_bits(tmp_path):
    a = np.full((16, 16), 65535, np.uint16)
    a[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    out = load_image(str(path), 16)
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_non_square_resized_and_center_cropped():
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    a[:, 10:30] = 255  # white centre band, black sides
    out = load_image(_png_bytes(Image.fromarray(a)), 10)
    assert out.shape == (10, 10, 3)
    assert out.mean() > 250  # the crop kept only the centre band


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"), "corrupt or truncated"),
    (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "too small"),
])
def test_bad_files_name_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(BadImageError, match=reason) as e:
        load_image(str(path), 64)
    assert "bad.jpg" in str(e.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.jpg: corrupt or truncated"):
        load_image(str(path), 64)


def test_model_range_round_trip():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    x = to_model_range(a)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(from_model_range(x), a)


# -- every kind of image bytes (issue 26) -----------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_bombs import gif_bomb, png_bomb  # noqa: E402


def _encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_too_large_png_is_refused_from_its_header():
    """The acceptance test: a 20000 x 20000 PNG is "too large", not "corrupt"."""
    data = png_bomb(20000, 20000)
    assert len(data) < 100_000  # a small file: a decompression bomb
    with pytest.raises(BadImageError, match=r"big.png: too large: 20000x20000") as e:
        load_image(data, 32, name="big.png")
    assert e.value.reason == "too large"


@pytest.mark.parametrize("data, size", [
    (png_bomb(9000, 9000, "L"), "9000x9000"),      # under Pillow's limit, over ours: our check
    (png_bomb(60000, 60000), "60000x60000"),       # over Pillow's hard limit too
    (gif_bomb(30000, 30000), "30000x30000"),
])
def test_bombs_are_too_large_never_decoded(data, size):
    with pytest.raises(BadImageError, match=f"too large: {size}") as e:
        load_image(data, 32)
    assert e.value.reason == "too large"


def test_pixel_budget_is_an_argument():
    data = _encoded(Image.new("RGB", (100, 50), (10, 20, 30)), "PNG")
    assert load_image(data, 16, max_pixels=5000).shape == (16, 16, 3)
    with pytest.raises(BadImageError, match="too large: 100x50, over the budget of 4999 pixels"):
        load_image(data, 16, max_pixels=4999)
    # more bytes than an uncompressed 16-bit RGBA image of 64 pixels + 1 MiB of metadata: not read
    with pytest.raises(BadImageError, match=f"too large: {2**20 + 513} bytes"):
        load_image(bytes(2**20 + 513), 16, max_pixels=64)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 64"):
        load_image(data, 16, max_pixels=10)


def _exif_rotated_jpeg():
    """A 40 x 20 JPEG, red left half and blue right half, tagged
    orientation 6 (show rotated 90 degrees clockwise)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    return _encoded(img, "JPEG", exif=exif, quality=95)


def test_image_kinds():
    # EXIF orientation 6: shown as 20 wide x 40 high, red on top
    out = load_image(_exif_rotated_jpeg(), 20)
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60 and out[17, 10, 2] > 200
    # animated GIF: the first frame
    frames = [Image.new("P", (16, 16), i) for i in (0, 1)]
    for f in frames:
        f.putpalette([0, 255, 0, 255, 0, 255] + [0] * 762)
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert tuple(load_image(gif, 16)[8, 8]) == (0, 255, 0)
    # palette with a transparent index: composited on white
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = load_image(_encoded(pal, "PNG", transparency=1), 16)
    assert tuple(out[8, 8]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)
    # CMYK JPEG, WebP, 16-bit, 1-bit, greyscale+alpha
    cmyk = load_image(_encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), 16)
    assert cmyk[8, 8, 0] > 200 and cmyk[8, 8, 1] < 60
    webp = load_image(_encoded(Image.new("RGB", (16, 16), (0, 0, 250)), "WEBP", lossless=True), 16)
    assert tuple(webp[8, 8]) == (0, 0, 250)
    deep = Image.fromarray(np.full((16, 16), 32768, np.uint16))
    assert tuple(load_image(_encoded(deep, "PNG"), 16)[0, 0]) == (128, 128, 128)  # round(32768 / 65535 * 255)
    assert tuple(load_image(_encoded(Image.new("1", (16, 16), 1), "PNG"), 16)[0, 0]) == (255, 255, 255)
    assert tuple(load_image(_encoded(Image.new("LA", (16, 16), (0, 0)), "PNG"), 16)[0, 0]) == (255, 255, 255)
    # degenerate inputs
    for data, reason in ((b"", "empty file"), (_encoded(Image.new("RGB", (1, 1)), "PNG"), "too small"),
                         (os.urandom(64), "corrupt or truncated image"),
                         (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "corrupt or truncated image")):
        with pytest.raises(BadImageError) as e:
            load_image(data, 16)
        assert e.value.reason == reason


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(BadImageError, match="not a regular file"):
        load_image(str(tmp_path), 16)


MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "I", "F")
SAVERS = {"PNG": ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I"), "JPEG": ("L", "RGB", "CMYK"),
          "GIF": ("L", "P"), "WEBP": ("RGB", "RGBA"), "BMP": ("1", "L", "P", "RGB"),
          "TIFF": ("1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")}
REASONS = {"corrupt or truncated image", "too small", "too large", "empty file"}


def test_fuzz_image_bytes(record_property):
    """Any bytes -> an RGB array of the asked size, or BadImageError with a
    known reason; well-formed images of side >= 8 always load."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tried = [0]

    @st.composite
    def images(draw):
        fmt = draw(st.sampled_from(sorted(SAVERS)))
        mode = draw(st.sampled_from(SAVERS[fmt]))
        w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
        img = img.convert(mode) if mode not in ("I;16", "I", "F") else img.convert("L").convert(mode)
        data = _encoded(img, fmt)
        damage = draw(st.sampled_from(["none", "truncate", "flip", "junk", "random"]))
        if damage == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif damage == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif damage == "junk":
            data = data + draw(st.binary(max_size=64))
        elif damage == "random":
            data = draw(st.binary(max_size=256))
        return data, damage, min(w, h)

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(images(), st.sampled_from([8, 16]))
    def run(case, resolution):
        tried[0] += 1
        data, damage, side = case
        try:
            out = load_image(data, resolution)
        except BadImageError as e:
            assert e.reason in REASONS, e
            assert damage not in ("none", "junk") or side < 8, e
            assert (side < 8) == (e.reason == "too small") or damage not in ("none", "junk")
            return
        assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8

    run()
    print(f"\nfuzz image bytes: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])
