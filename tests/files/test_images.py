"""Decoding every kind of image to upright RGB, sizing, limits, and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from nst_batch.files import decode, encode
from nst_batch.files.decode import to_tensor
from nst_batch.files.encode import to_pil
from nst_batch.errors import PairError


def rgb_at(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel((x, y))


# -- orientation and colour modes -------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 24), (200, 30, 30))
    im.paste((30, 30, 200), (0, 0, 10, 24))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    out = decode.load_rgb(path)
    assert out.size == (24, 40)  # transposed
    r, g, b = rgb_at(out, 12, 4)  # the left band is now at the top
    assert b > 150 and r < 100


def test_heic_orientation_is_applied_once(tmp_path):
    # pillow-heif turns the photo upright itself and resets the EXIF tag: no second rotation here.
    pillow_heif = pytest.importorskip("pillow_heif")
    im = Image.new("RGB", (40, 24), (200, 30, 30))
    im.paste((30, 30, 200), (0, 0, 10, 24))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display, as a phone held upright writes it
    path = tmp_path / "rotated.heic"
    pillow_heif.from_pillow(im).save(str(path), exif=exif.tobytes(), quality=95)
    out = decode.load_rgb(path)
    assert out.size == (24, 40)
    r, g, b = rgb_at(out, 12, 4)  # the left band is now at the top
    assert b > 150 and r < 100


def test_grey_L(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (20, 20), 100).save(p)
    assert rgb_at(decode.load_rgb(p), 5, 5) == (100, 100, 100)


def test_grey_alpha_LA_over_white(tmp_path):
    p = tmp_path / "la.png"
    im = Image.new("LA", (20, 20), (50, 255))
    im.putpixel((0, 0), (50, 0))  # fully transparent
    im.save(p)
    out = decode.load_rgb(p)
    assert rgb_at(out, 0, 0) == (255, 255, 255)
    assert rgb_at(out, 5, 5) == (50, 50, 50)


def test_palette_P(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.save(p)
    assert rgb_at(decode.load_rgb(p), 3, 3) == (10, 200, 30)


def test_palette_with_transparency_over_white(tmp_path):
    p = tmp_path / "pt.png"
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((2, 2), 0)
    im.save(p, transparency=0)  # palette index 0 (black) is transparent
    out = decode.load_rgb(p)
    assert rgb_at(out, 2, 2) == (255, 255, 255)  # not black
    assert rgb_at(out, 3, 3) == (10, 200, 30)


def test_gif_with_transparency(tmp_path):
    p = tmp_path / "t.gif"
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((2, 2), 0)
    im.save(p, transparency=0)
    out = decode.load_rgb(p)
    assert rgb_at(out, 2, 2) == (255, 255, 255)
    assert rgb_at(out, 3, 3) == (10, 200, 30)


def test_rgba_composited_over_white(tmp_path):
    p = tmp_path / "rgba.png"
    im = Image.new("RGBA", (20, 20), (0, 0, 255, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    im.save(p)
    out = decode.load_rgb(p)
    assert rgb_at(out, 0, 0) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in rgb_at(out, 1, 0))
    assert rgb_at(out, 5, 5) == (0, 0, 255)


def test_cmyk(tmp_path):
    p = tmp_path / "cmyk.tif"
    im = Image.new("CMYK", (20, 20), (255, 0, 0, 0))  # pure cyan
    im.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    im.putpixel((1, 0), (0, 0, 0, 255))  # full black
    im.save(p)
    out = decode.load_rgb(p)
    assert rgb_at(out, 5, 5) == (0, 255, 255)
    assert rgb_at(out, 0, 0) == (255, 255, 255)
    assert rgb_at(out, 1, 0) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(p, quality=100)  # magenta + yellow = red
    r, g, b = rgb_at(decode.load_rgb(p), 5, 5)
    assert r > 240 and g < 15 and b < 15


def _save16(path, a: np.ndarray):
    im = Image.fromarray(a.astype(np.uint16))
    assert im.mode == "I;16"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # a real 16-bit PNG on disk


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    a = np.zeros((20, 20))
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32768, 257
    _save16(p, a)
    out = decode.load_rgb(p)
    assert rgb_at(out, 0, 0) == (255, 255, 255)
    assert rgb_at(out, 1, 0) == (128, 128, 128)
    assert rgb_at(out, 2, 0) == (1, 1, 1)
    assert rgb_at(out, 5, 5) == (0, 0, 0)


def test_dark_16bit_grey_stays_dark(tmp_path):
    # A 16-bit photo whose brightest pixel is 255 of 65535 is nearly black; it must not be read as 8-bit white.
    p = tmp_path / "dark16.png"
    a = np.full((20, 20), 255)
    a[0, 0] = 0
    _save16(p, a)
    out = decode.load_rgb(p)
    assert rgb_at(out, 5, 5) == (1, 1, 1)


def test_16bit_rgb_png(tmp_path):
    # Pillow reads 16-bit RGB PNGs as 8-bit RGB: check the colours survive.
    import zlib, struct  # noqa: E401  (a 16-bit RGB PNG written by hand: Pillow cannot write one)

    w = h = 16
    raw = b"".join(b"\x00" + struct.pack(">HHH", 65535, 0, 32896) * w for _ in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    p = tmp_path / "rgb16.png"
    p.write_bytes(png)
    assert rgb_at(decode.load_rgb(p), 3, 3) == (255, 0, 128)


# -- sizes and limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("w, h, long_side, expect", [
    (64, 40, 32, (32, 20)),
    (36, 60, 32, (19, 32)),
    (40, 40, 48, (48, 48)),
    (30, 20, 60, (60, 40)),  # upscaling keeps the ratio too
])
def test_to_tensor_keeps_aspect_ratio(w, h, long_side, expect):
    im = Image.new("RGB", (w, h), (255, 128, 0))
    t = to_tensor(im, long_side)
    assert t.shape == (1, 3, expect[1], expect[0])
    assert t.dtype == torch.float32
    assert torch.allclose(t[0, :, 5, 5], torch.tensor([1.0, 128 / 255, 0.0]), atol=1 / 255)


def test_to_tensor_too_small_at_this_size():
    with pytest.raises(PairError) as e:
        to_tensor(Image.new("RGB", (200, 40)), 64)  # 64x13
    assert e.value.kind == "too_small"


def test_to_pil_round_trip():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB")
    assert np.array_equal(np.asarray(to_pil(to_tensor(im, 30))), np.asarray(im))


@pytest.mark.parametrize("w, h", [(15, 40), (40, 15), (8, 8)])
def test_too_small(tmp_path, w, h):
    p = make_image(tmp_path / "small.png", w, h, 0)
    with pytest.raises(PairError) as e:
        decode.load_rgb(p)
    assert e.value.kind == "too_small" and "small.png" in str(e.value)


def test_over_max_megapixels(tmp_path):
    p = make_image(tmp_path / "big.png", 64, 64, 0)
    with pytest.raises(PairError) as e:
        decode.load_rgb(p, max_megapixels=0.001)
    assert e.value.kind == "too_large" and "big.png" in str(e.value) and "max_megapixels" in str(e.value)
    assert decode.load_rgb(p, max_megapixels=0.005).size == (64, 64)


def test_decompression_bomb_over_twice_pillows_limit(tmp_path, monkeypatch):
    p = make_image(tmp_path / "bomb.png", 64, 64, 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000: Pillow refuses to open it
    with pytest.raises(PairError) as e:
        decode.load_rgb(p)
    assert e.value.kind == "too_large" and "bomb.png" in str(e.value)


def test_max_megapixels_not_undercut_by_pillows_warning(tmp_path, monkeypatch):
    # Pillow warns from 89.5 MP, under the 100 MP default: a 95 MP photo must load. Scaled down here:
    # Pillow's warning at 3000 px, our limit at 0.005 MP, the image 4096 px.
    p = make_image(tmp_path / "big.png", 64, 64, 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    assert decode.load_rgb(p, max_megapixels=0.005).size == (64, 64)
    with pytest.raises(PairError) as e:
        decode.load_rgb(p, max_megapixels=0.004)
    assert e.value.kind == "too_large" and "max_megapixels" in str(e.value)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", b"hello"])
def test_corrupt_file_is_unreadable(tmp_path, data):
    p = tmp_path / "broken.jpg"
    p.write_bytes(data)
    with pytest.raises(PairError) as e:
        decode.load_rgb(p)
    assert e.value.kind == "unreadable" and "broken.jpg" in str(e.value)


def test_truncated_jpeg_is_unreadable(tmp_path):
    p = make_image(tmp_path / "full.jpg", 64, 64, 0)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(p.read_bytes()[:300])
    with pytest.raises(PairError) as e:
        decode.load_rgb(cut)
    assert e.value.kind == "unreadable"


# -- writing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_save_atomic_writes_and_leaves_no_temp_file(tmp_path, fmt):
    im = Image.new("RGB", (30, 20), (10, 100, 200))
    path = tmp_path / "sub" / f"out.{fmt}"
    encode.save_atomic(im, path, fmt, quality=95)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with Image.open(path) as back:
        assert back.format == ("PNG" if fmt == "png" else "JPEG")
        assert back.size == (30, 20)


def test_save_atomic_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jpg"
    encode.save_atomic(Image.new("RGB", (20, 20), (1, 2, 3)), path, "jpg")
    before = path.read_bytes()
    with pytest.raises(OSError):
        encode.save_atomic(Image.new("RGBA", (20, 20)), path, "jpg")  # JPEG cannot hold RGBA: raises mid-save
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]
    with pytest.raises(OSError):
        encode.save_atomic(Image.new("RGBA", (20, 20)), tmp_path / "new.jpg", "jpg")
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]  # no partial new.jpg, no temp file
