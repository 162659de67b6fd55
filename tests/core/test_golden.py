"""Golden outputs: the same settings give byte-identical pixels and files, whichever way the code that
makes them is arranged. Pinned from the code before the engine was split from its I/O, and again when the
optimiser changed (ENGINE_VERSION 4: core/lbfgs.py); a change here means outputs of finished runs would no
longer be reproduced bit for bit."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from nst_batch.config.manifest import Member, Settings
from nst_batch.files import decode
from nst_batch.files.encode import encode

from conftest import engine_of, path_job

ROOT = Path(__file__).resolve().parents[2]
CONTENT, STYLES = ROOT / "data/content", ROOT / "data/styles"
LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _settings(**kw) -> Settings:
    base = dict(content=CONTENT, styles=STYLES, size=40, steps=4, log_every=2, scales=(0.5, 1.0), device="cpu",
                layers=LAYERS, style_weight=30.0)
    return Settings(**{**base, **kw})


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        chunks.append((data[i + 4:i + 8], data[i + 8:i + 8 + n]))
        i += 12 + n
    return chunks


def _png_digest(data: bytes) -> str:
    """The file's bytes but its ICC profile, which is checked apart: lcms stamps the sRGB profile it builds
    with the time it was built, so the profile's bytes differ from one process to the next."""
    chunks = _png_chunks(data)
    (iccp,) = [c for kind, c in chunks if kind == b"iCCP"]
    name, _, rest = iccp.partition(b"\x00")
    assert rest[:1] == b"\x00" and zlib.decompress(rest[1:]) == decode.srgb_profile(), name
    return _sha(b"".join(kind + c for kind, c in chunks if kind != b"iCCP"))


def _made(s: Settings, style: str, key: str, members: tuple[Member, ...] = ()):
    engine = engine_of(s)
    job = path_job(engine, CONTENT / "chelsea.jpg", members[0].path if members else STYLES / style, style=style,
                   key=key, members=members)
    (m,) = engine.make([job])
    assert m.ok, m.error
    return m


def _digests(s: Settings, m) -> tuple[str, str, str, str]:
    pixels = _sha(m.image.contiguous().numpy().tobytes())
    png8 = encode(m.image, None, s.replace(format="png", bit_depth=8)).data
    png16 = encode(m.image, None, s.replace(format="png", bit_depth=16)).data
    thumb = encode(m.image, None, s).thumb
    return pixels, _png_digest(png8), _png_digest(png16), _sha(thumb)


BLEND = tuple(Member(STYLES / f, w, f"golden-{f}") for f, w in (("starry_night.jpg", 0.7), ("great_wave.jpg", 0.3)))

CASES = {
    "style": (dict(), "starry_night.jpg", "golden-starry", ()),
    "preserve": (dict(colors="preserve"), "starry_night.jpg", "golden-starry", ()),
    "blend": (dict(), "dusk", "golden-dusk", BLEND),
}

# (pixels as float32, 8-bit PNG, 16-bit PNG, thumbnail JPEG), each a sha256 prefix
GOLDEN = {
    "style": ("2fea4d48d479dc29", "d0cb76975d5cd391", "152b23d972deff90", "d63ddd7d7eee4cb9"),
    "preserve": ("e67ffa1d5b93a938", "95be4490d210aa4f", "22e9ae78785f6326", "ff823c09fe714217"),
    "blend": ("08f05419f3291120", "96c59f9a2d0dc437", "ac4ea23d610892cb", "5dbe5ee2b0877577"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_are_byte_identical_to_the_pinned_ones(case):
    kw, style, key, members = CASES[case]
    s = _settings(**kw)
    got = _digests(s, _made(s, style, key, members))
    assert got == GOLDEN[case]
