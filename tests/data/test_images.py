"""Image input policy: modes, cropping, and bad files named in errors."""
import io

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data.images import BadImageError, from_model_range, load_image, to_model_range


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
