"""Colour-managed, metadata-keeping files, and output names.

Inputs with an ICC profile are converted to sRGB (checked against the textbook Display P3 -> sRGB
matrix, with a P3 profile built here: Pillow has no P3 builder and no system profile is relied on);
outputs carry an sRGB profile and the photo's date and camera, GPS only when asked; 16-bit PNGs keep
more than 8 bits (read back by the small decoder below, not by Pillow, which reads 8 bits of them);
the `name` template, the mirrored folder tree, and refused collisions.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageCms
from PIL.TiffImagePlugin import IFDRational
from rich.console import Console


from nst_batch.files import decode, encode
from nst_batch.run import local
from nst_batch.errors import ConfigError
from nst_batch.batch.ledger import Ledger
from nst_batch.config.manifest import Settings, apply, load
from nst_batch.batch.plan import make_plan, recipe_hash
from nst_batch.run.progress import Display

from conftest import cli, make_image

B = ExifTags.Base


# -- an ICC profile made here: a v2 matrix/TRC display profile ---------------------------------------

P3 = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))  # Display P3: DCI-P3 primaries, D65, sRGB's curve
SRGB = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
D65 = (0.3127, 0.3290)
D50 = np.array([0.9642, 1.0, 0.8249])  # the ICC profile connection space's white
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def srgb_decode(v):
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(v):
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(np.maximum(v, 0), 1 / 2.4) - 0.055)


def rgb_to_xyz(primaries, white=D65) -> np.ndarray:
    xyz = lambda x, y: np.array([x / y, 1.0, (1 - x - y) / y])  # noqa: E731
    m = np.stack([xyz(*p) for p in primaries], axis=1)
    return m * np.linalg.solve(m, xyz(*white))


def matrix_profile(desc: str, primaries) -> bytes:
    """An ICC v2 display profile: D50-adapted (Bradford) colorants and sRGB's tone curve, as Apple's
    Display P3 profile holds them (ICC.1:2001-04, sections 6 and 6.5)."""
    m = rgb_to_xyz(primaries)
    cone_src, cone_dst = BRADFORD @ (m @ np.ones(3)), BRADFORD @ D50
    colorants = np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD @ m
    s15 = lambda x: struct.pack(">i", round(x * 65536))  # noqa: E731
    xyz = lambda v: b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)  # noqa: E731
    curve = b"curv\0\0\0\0" + struct.pack(">I", 1024) + np.round(
        srgb_decode(np.linspace(0, 1, 1024)) * 65535).astype(">u2").tobytes()
    d = desc.encode()
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(d) + 1) + d + b"\0" * 79),
            (b"wtpt", xyz(D50)), (b"rXYZ", xyz(colorants[:, 0])), (b"gXYZ", xyz(colorants[:, 1])),
            (b"bXYZ", xyz(colorants[:, 2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
            (b"cprt", b"text\0\0\0\0No copyright, use freely\0")]
    table, data, start = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += struct.pack(">4sII", sig, start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 28 + b"".join(s15(c) for c in D50)
              + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


P3_ICC = matrix_profile("Display P3 (test)", P3)
P3_TO_SRGB = np.linalg.inv(rgb_to_xyz(SRGB)) @ rgb_to_xyz(P3)


def p3_expected(a: np.ndarray) -> np.ndarray:
    """8-bit Display P3 values as 8-bit sRGB, by the textbook matrix (out-of-gamut values clipped)."""
    return np.clip(srgb_encode(np.clip(srgb_decode(a / 255.0) @ P3_TO_SRGB.T, 0, 1)) * 255, 0, 255)


# -- a PNG decoder of its own: zlib, the five row filters, 8 or 16 bits, truecolour --------------------

def read_png(data: bytes) -> tuple[np.ndarray, dict[str, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, idat = 8, {}, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body), kind
        idat += body if kind == b"IDAT" else b""
        chunks.setdefault(kind.decode(), body)
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks["IHDR"][:10])
    assert ctype == 2 and depth in (8, 16)
    bpp = 3 * depth // 8
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp).astype(np.int64)
    prev, rows = np.zeros(w * bpp, np.int64), []
    for line in raw:
        cur = np.zeros(w * bpp, np.int64)
        for x in range(w * bpp):
            a = cur[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            cur[x] = (line[1 + x] + (0, a, b, (a + b) // 2, paeth)[line[0]]) % 256
        rows.append(cur)
        prev = cur
    b = np.array(rows).reshape(h, w, 3, depth // 8)
    return (b[..., 0] * 256 + b[..., 1] if depth == 16 else b[..., 0]), chunks


def profile_description(icc: bytes) -> str:
    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()


def camera_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[B.Make], exif[B.Model], exif[B.Orientation] = "Fujifilm", "X-T5", orientation
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[B.DateTimeOriginal], sub[B.OffsetTimeOriginal] = "2024:07:14 18:03:09", "+02:00"
    sub[B.ExifImageWidth], sub[B.ExifImageHeight] = 999, 777  # the camera's, not the output's
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[1], gps[2] = "N", (IFDRational(48), IFDRational(51), IFDRational(2964, 100))
    return exif


# -- colour management ----------------------------------------------------------------------------

def test_a_display_p3_photo_is_converted_to_srgb(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "p3.png", icc_profile=P3_ICC)
    Image.fromarray(a).save(tmp_path / "untagged.png")
    assert profile_description(P3_ICC) == "Display P3 (test)"
    got = np.asarray(decode.load_rgb(tmp_path / "p3.png"), dtype=np.float64)
    # lcms (relative colorimetric) agrees with the matrix to rounding; the pixels really moved.
    assert np.abs(got - p3_expected(a)).max() <= 1.0
    assert np.abs(got - a).mean() > 5
    assert np.array_equal(np.asarray(decode.load_rgb(tmp_path / "untagged.png")), a)  # untagged: sRGB already
    # P3 pure green is outside sRGB: clipped to sRGB's green edge, red channel 0 (it would be negative).
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "green.png", icc_profile=P3_ICC)
    r, g, b = decode.load_rgb(tmp_path / "green.png").getpixel((5, 5))
    assert r == 0 and g == 255 and b <= 80, (r, g, b)
    # The report's thumbnails of the photos show the same colours.
    thumb = encode.shrink(Image.open(tmp_path / "p3.png"))
    assert np.abs(np.asarray(thumb, np.float64) - p3_expected(a)).max() <= 1.0


def test_a_broken_profile_leaves_the_pixels_and_says_so(tmp_path):
    a = np.asarray(Image.open(make_image(tmp_path / "x.png", 20, 20, 3)))
    Image.fromarray(a).save(tmp_path / "broken.png", icc_profile=b"not a profile at all")
    im = decode.load_rgb(tmp_path / "broken.png")
    assert np.array_equal(np.asarray(im), a)
    assert "ICC profile is unreadable" in decode.photo_meta(im).note
    assert decode.photo_meta(decode.load_rgb(tmp_path / "x.png")).note is None


# -- metadata and bit depth in the files ------------------------------------------------------------

def _made(t: torch.Tensor, meta: decode.PhotoMeta | None) -> tuple[torch.Tensor, decode.PhotoMeta | None]:
    return t, meta  # what encode takes: the made image and what its output keeps of its photo


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_outputs_carry_srgb_and_the_photos_date_and_camera_and_gps_only_when_asked(tmp_path, fmt):
    Image.new("RGB", (30, 20), (90, 120, 150)).save(tmp_path / "photo.jpg", exif=camera_exif(orientation=6))
    photo = decode.load_rgb(tmp_path / "photo.jpg")
    assert photo.size == (20, 30)  # upright
    made = _made(torch.rand(1, 3, 30, 20, generator=torch.Generator().manual_seed(0)), decode.photo_meta(photo))
    for keep_gps in (False, True):
        enc = encode.encode(*made, Settings(format=fmt, keep_gps=keep_gps))
        with Image.open(io.BytesIO(enc.data)) as out:
            assert out.format == {"png": "PNG", "jpg": "JPEG"}[fmt]
            assert "sRGB" in profile_description(out.info["icc_profile"])
            exif = out.getexif()
            sub = exif.get_ifd(ExifTags.IFD.Exif)
            assert (exif[B.Make], exif[B.Model], exif[B.Orientation]) == ("Fujifilm", "X-T5", 1)
            assert (sub[B.DateTimeOriginal], sub[B.OffsetTimeOriginal]) == ("2024:07:14 18:03:09", "+02:00")
            assert (sub[B.ExifImageWidth], sub[B.ExifImageHeight]) == out.size == (20, 30)
            gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
            assert (gps == {}) != keep_gps
            if keep_gps:
                assert gps[1] == "N" and [float(x) for x in gps[2]] == [48.0, 51.0, 29.64]
    # A photo with nothing to keep gets no EXIF at all, still the profile.
    enc = encode.encode(*_made(made[0], decode.PhotoMeta()), Settings())
    with Image.open(io.BytesIO(enc.data)) as out:
        assert "exif" not in out.info and "icc_profile" in out.info


def test_16_bit_png_keeps_the_optimisers_precision(tmp_path):
    # A smooth ramp of 4000 levels: 8 bits keep 256 of them; 16 bits keep them all, each within 1/65535.
    t = torch.linspace(0.1, 0.9, 4000, dtype=torch.float32).reshape(1, 1, 40, 100).repeat(1, 3, 1, 1)
    t[:, 1] = 1 - t[:, 1]
    meta = decode.PhotoMeta(taken="2024:07:14 18:03:09", make="Fujifilm", model="X-T5")
    enc = encode.encode(*_made(t, meta), Settings(bit_depth=16))
    a, chunks = read_png(enc.data)
    expected = (t[0].permute(1, 2, 0).double().numpy() * 65535)
    assert a.dtype != np.uint8 and np.abs(a - expected).max() <= 0.5
    assert len(np.unique(a[..., 0])) == 4000 and not np.all(a % 257 == 0)
    assert chunks["IHDR"][8] == 16 and "iCCP" in chunks and "eXIf" in chunks
    # Pillow reads the file (CRCs, profile, EXIF): 8 bits of it, the high byte of each sample.
    with Image.open(io.BytesIO(enc.data)) as im:
        im.load()
        assert im.size == (100, 40) and np.abs(np.asarray(im).astype(int) - (a >> 8)).max() == 0
        assert "sRGB" in profile_description(im.info["icc_profile"])
        assert im.getexif()[B.Make] == "Fujifilm"
    assert chunks["eXIf"][:4] in (b"MM\0*", b"II*\0")  # TIFF data, without JPEG's "Exif" prefix
    # The thumbnail still comes from the same pixels, at 8 bits.
    with Image.open(io.BytesIO(enc.thumb)) as th:
        assert th.format == "JPEG" and th.size == (100, 40)


def test_bit_depth_16_needs_png_and_the_new_keys_are_checked():
    with pytest.raises(ConfigError, match="key 'bit_depth' 16 needs format png"):
        apply(Settings(), {"format": "jpg", "bit_depth": 16}, "m.yaml")
    with pytest.raises(ConfigError, match="key 'bit_depth' must be 8 or 16"):
        apply(Settings(), {"bit_depth": 12}, "m.yaml")
    with pytest.raises(ConfigError, match="key 'keep_gps' must be true or false"):
        apply(Settings(), {"keep_gps": "yes"}, "m.yaml")
    # What changes the file changes the recipe; where the file goes does not.
    s = Settings()
    base = recipe_hash(s, "a", "b")
    assert recipe_hash(s.replace(bit_depth=16), "a", "b") != base != recipe_hash(s.replace(keep_gps=True), "a", "b")
    assert recipe_hash(s.replace(name="{content}/{style}"), "a", "b") == base


# -- names and layout -------------------------------------------------------------------------------

def _tree(tmp_path: Path, photos: list[str], styles=("oils.png", "ink.png")) -> tuple[Path, Path]:
    content, style_dir = tmp_path / "c", tmp_path / "s"
    for i, p in enumerate(photos):
        make_image(content / p, 20, 20, i)
    for i, s in enumerate(styles):
        make_image(style_dir / s, 20, 20, 50 + i)
    return content, style_dir


def _outputs(tmp_path, photos, styles=("oils.png", "ink.png"), **kw) -> list[str]:
    content, style_dir = _tree(tmp_path, photos, styles)
    return [p.output for p in make_plan(Settings(content=content, styles=style_dir, out=tmp_path / "out", **kw))]


def test_name_templates_lay_out_the_outputs(tmp_path):
    photos = ["a.jpg", "trip/day1/b.png"]
    assert _outputs(tmp_path, photos) == ["ink/a.png", "oils/a.png", "ink/trip/day1/b.png", "oils/trip/day1/b.png"]
    for template, want in [
        ("{content}/{style}", ["a/ink.png", "a/oils.png", "trip/day1/b/ink.png", "trip/day1/b/oils.png"]),
        ("{style}__{content}", ["ink__a.png", "oils__a.png", "ink__trip/day1/b.png", "oils__trip/day1/b.png"]),
        ("{folder}/{style}-{photo}", ["ink-a.png", "oils-a.png", "trip/day1/ink-b.png", "trip/day1/oils-b.png"]),
    ]:
        assert _outputs(tmp_path, photos, name=template) == want, template


@pytest.mark.parametrize("template, photos, both", [
    ("{style}/{photo}", ["x/a.jpg", "y/a.png"], "x/a.jpg and oils.png × y/a.png"),
    ("{style}/{photo}", ["x/A.jpg", "y/a.png"], "x/A.jpg and oils.png × y/a.png"),  # one file on macOS
    ("{content}", ["a.jpg"], "ink.png × a.jpg and oils.png × a.jpg"),  # no {style}, two styles
    ("{style}/{content}", ["a.png/b.jpg", "a.jpg"], "a.png/b.jpg"),  # a file where a folder must be
])
def test_colliding_outputs_are_refused_at_plan_time_naming_both_pairs(tmp_path, template, photos, both):
    with pytest.raises(ConfigError) as e:
        _outputs(tmp_path, photos, styles=("oils.png", "ink.png") if "{style}" not in template else ("oils.png",),
                 name=template)
    msg = str(e.value)
    assert "\n" not in msg and "key 'name'" in msg and both in msg, msg


def test_an_output_inside_the_reports_own_folders_or_hidden_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"contact_sheets/a\.jpg is among the output folder's own files.*key 'name'"):
        _outputs(tmp_path, ["a.png"], styles=("contact_sheets.png",), format="jpg")
    with pytest.raises(ConfigError, match=r"output \.png would be hidden or outside the output folder \(key 'name'\)"):
        _outputs(tmp_path, ["a.png"], styles=("oils.png",), name="{folder}")  # nothing left of it at the top


@pytest.mark.parametrize("template, why", [
    ("../{style}/{content}", "no part may start with '.'"),
    ("{style}/../../{content}", "no part may start with '.'"),
    ("/tmp/{style}/{content}", "relative to the output folder"),
    ("{style}\\{content}", "relative to the output folder"),
    ("{style}/{name}", "may use {style}, {content}, {photo}, {folder} only"),
    ("{content!r}", "may use"),
    ("{content:>20}", "may use"),
    ("{style", "not a valid template"),
    ("", "must be a text"),
])
def test_templates_that_could_leave_the_output_folder_are_refused(template, why):
    with pytest.raises(ConfigError, match="key 'name'") as e:
        apply(Settings(), {"name": template}, "m.yaml")
    assert why in str(e.value)


def test_a_collision_stops_the_run_with_one_line_and_exit_2(folders):
    content, styles, out = folders
    r = cli("run", "--content", str(content), "--styles", str(styles), "--out", str(out), "--device", "cpu",
            "--set", "name={photo}", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "would both be written to square.png (key 'name'" in r.stderr, r.stderr
    assert not out.exists()  # refused before anything is created


def test_an_unquoted_template_in_the_manifest_says_to_quote_it(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("name: {style}\n")
    with pytest.raises(ConfigError, match="key 'name' must be a quoted text"):
        load(tmp_path / "pipeline.yaml")
    (tmp_path / "pipeline.yaml").write_text('name: "{content}/{style}"\nkeep_gps: true\nbit_depth: 16\n')
    s = load(tmp_path / "pipeline.yaml")
    assert (s.name, s.keep_gps, s.bit_depth) == ("{content}/{style}", True, 16)


# -- end to end: a run keeps the tree, the colours and the metadata; a second moves and redoes --------

def test_a_run_mirrors_the_tree_under_each_style_with_colour_and_metadata(fast_settings, tmp_path):
    content, styles = tmp_path / "photos", tmp_path / "paintings"
    a = np.asarray(Image.open(make_image(tmp_path / "src.png", 40, 24, 7)))
    (content / "trip" / "day1").mkdir(parents=True)
    # P3, sideways (orientation 6: upright it is 24 x 40), with date, camera and position.
    Image.fromarray(a).save(content / "trip" / "day1" / "p3.jpg", quality=95, icc_profile=P3_ICC,
                            exif=camera_exif(orientation=6))
    Image.fromarray(a).save(content / "top.png", icc_profile=b"broken")
    make_image(styles / "s1.png", 32, 32, 10)
    make_image(styles / "s2.png", 32, 32, 11)
    s = fast_settings.replace(content=content, styles=styles, out=tmp_path / "out", size=32, steps=2,
                              layers={"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]})  # a short VGG: fast
    quiet = Display(Console(quiet=True))
    assert local.run(s, quiet).made == 4
    for style in ("s1", "s2"):  # the photo's folders under each style
        assert sorted(p.relative_to(s.out / style).as_posix() for p in (s.out / style).rglob("*.png")) == [
            "top.png", "trip/day1/p3.png"]
        with Image.open(s.out / style / "trip" / "day1" / "p3.png") as out:
            exif = out.getexif()
            sub = exif.get_ifd(ExifTags.IFD.Exif)
            assert "sRGB" in profile_description(out.info["icc_profile"])
            assert (exif[B.Make], exif[B.Orientation], sub[B.DateTimeOriginal]) == ("Fujifilm", 1, "2024:07:14 18:03:09")
            assert out.size == (19, 32) and (sub[B.ExifImageWidth], sub[B.ExifImageHeight]) == out.size
            assert exif.get_ifd(ExifTags.IFD.GPSInfo) == {}
    with Ledger(s.out) as led:
        notes = {r.output: r.note for r in led.rows()}
    assert "photo: its ICC profile is unreadable" in notes["s1/top.png"] and notes["s1/trip/day1/p3.png"] is None

    # Another layout and 16-bit files with GPS: every pair is redone (the files differ), at its new place.
    s2 = s.replace(name="{content}/{style}", keep_gps=True, bit_depth=16)
    assert local.run(s2, quiet).made == 4
    data = (s.out / "trip" / "day1" / "p3" / "s2.png").read_bytes()
    b16, chunks = read_png(data)
    assert chunks["IHDR"][8] == 16 and b16.shape == (32, 19, 3) and not np.all(b16 % 257 == 0)
    with Image.open(io.BytesIO(data)) as out:
        assert out.getexif().get_ifd(ExifTags.IFD.GPSInfo)[1] == "N"
    with Ledger(s.out) as led:
        assert sorted(r.output for r in led.rows() if r.state == "done") == [
            "top/s1.png", "top/s2.png", "trip/day1/p3/s1.png", "trip/day1/p3/s2.png"]
