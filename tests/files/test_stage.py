"""The I/O stage: photos decoded ahead and outputs written behind the compute, on threads of their own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from nst_batch.config.manifest import Settings
from nst_batch.config.objective import MIN_SIDE
from nst_batch.errors import PairError
from nst_batch.files import stage
from nst_batch.files.decode import PhotoMeta
from nst_batch.files.encode import encode

from conftest import make_image

STEP = 0.15  # seconds each of decode, compute and write takes in the overlap test


def _drive(io: stage.IOStage, paths: list[str], out: Path, compute) -> list:
    """A driver's loop, as run.runner's: take this photo, ask for the next, compute, write behind."""
    done = []
    for i, path in enumerate(paths):
        photo, meta = io.photo(path)
        if i + 1 < len(paths):
            io.prefetch(paths[i + 1])
        image = compute(photo)
        io.write(path, image, meta, Settings(), out / f"{i}.png", out / f"{i}.jpg")
        done += [tag for tag, error, _ in io.finished() if error is None]
    done += [tag for tag, error, _ in io.finished(wait=True) if error is None]
    return done


def test_the_stage_overlaps_decoding_and_writing_with_the_compute(tmp_path, monkeypatch):
    """Each of decode, compute and write takes STEP: one after the other, n photos take 3 n STEP; with the
    stage, about n STEP plus the first decode and the last write. The margin is wide: only overlap matters."""
    decoded, written = [], []

    def slow_load(path, size, max_mp):
        time.sleep(STEP)
        decoded.append(path)
        return torch.zeros(1, 3, 4, 4), PhotoMeta()

    def slow_write(image, meta, settings, path, thumb):
        time.sleep(STEP)
        written.append(path)
        return time.time()

    monkeypatch.setattr(stage, "load_photo", slow_load)
    monkeypatch.setattr(stage, "encode_and_write", slow_write)
    n = 8
    paths = [f"p{i}.png" for i in range(n)]
    io = stage.IOStage(32, 100.0)
    t0 = time.perf_counter()
    try:
        done = _drive(io, paths, tmp_path, lambda photo: time.sleep(STEP) or photo)
    finally:
        io.close()
    took = time.perf_counter() - t0
    assert done == paths and len(decoded) == n and len(written) == n  # each photo decoded once, each written
    serial = 3 * n * STEP
    assert took < 0.75 * serial, (took, serial)  # overlapped: about (n + 2) STEP = 1.5 s against 3.6 s


def test_a_photo_is_decoded_once_for_all_its_styles_and_a_bad_one_fails_each_time(tmp_path, monkeypatch):
    make_image(tmp_path / "a.png", 48, 32, 1)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    calls = []
    real = stage.load_photo
    monkeypatch.setattr(stage, "load_photo", lambda *a: calls.append(a[0]) or real(*a))
    io = stage.IOStage(32, 100.0)
    try:
        first, meta = io.photo(str(tmp_path / "a.png"))
        again, _ = io.photo(str(tmp_path / "a.png"))
        assert first is again and first.shape == (1, 3, 21, 32) and isinstance(meta, PhotoMeta)
        for _ in range(2):
            with pytest.raises(PairError) as e:
                io.photo(str(tmp_path / "bad.jpg"))
            assert e.value.kind == "unreadable"
    finally:
        io.close()
    assert [Path(c).name for c in calls] == ["a.png", "bad.jpg"]


def test_what_the_stage_writes_is_the_encoded_image_and_its_thumbnail(tmp_path):
    make_image(tmp_path / "a.png", 48, 32, 1)
    io = stage.IOStage(32, 100.0)
    image = torch.rand(1, 3, 21, 32, generator=torch.Generator().manual_seed(0))
    s = Settings()
    try:
        io.write("tag", image, PhotoMeta(), s, tmp_path / "out" / "a.png", tmp_path / "out" / "thumbs" / "a.jpg")
        ((tag, error, finished_at),) = list(io.finished(wait=True))
    finally:
        io.close()
    assert tag == "tag" and error is None and finished_at <= time.time()
    enc = encode(image, PhotoMeta(), s)
    # Byte for byte but the sRGB profile, which lcms stamps with the time it was made (same process: same).
    assert (tmp_path / "out" / "a.png").read_bytes() == enc.data
    assert (tmp_path / "out" / "thumbs" / "a.jpg").read_bytes() == enc.thumb


def test_style_images_are_decoded_once_and_kept_for_a_few_styles(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "STYLE_IMAGES", 1)
    wide = make_image(tmp_path / "wide.png", 200, 40, 2)  # 5:1: its short side needs the long one over 32
    styles = stage.StyleImages(100.0, {"w": wide})
    t = styles("w", 32)
    assert min(t.shape[-2:]) >= MIN_SIDE and max(t.shape[-2:]) > 32  # the short side kept at VGG's minimum
    styles.add("missing", tmp_path / "nothing.png")
    with pytest.raises(PairError, match="^style "):
        styles("missing", 32)
    assert styles.held() == ["missing"] and styles.meta("w") == PhotoMeta()
