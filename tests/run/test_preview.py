"""`nst-batch preview`: sample photos in every style at a few strengths, through the CLI as a user runs it,
and the pieces that decide what it shows (which photos, which labels)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, make_image
from nst_batch.batch.plan import _matches, make_plan
from nst_batch.config import manifest
from nst_batch.errors import ConfigError
from nst_batch.files.hashing import file_hash
from nst_batch.run import preview as pv

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them

FACTORS = (1 / 3, 1.0, 3.0)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Tiny images: one thread is as fast, and does not spin against other processes on a 2-core machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _manifest(tmp_path: Path, content: Path, styles: Path, out: Path, extra: str = "") -> Path:
    m = tmp_path / "pipeline.yaml"
    # tv_weight 0: smoothing alone moves these high-frequency test photos' pixels, most where the style
    # is weakest; the pixel distance is to measure the style's pull only.
    m.write_text(f"content: {content}\nstyles: {styles}\nout: {out}\ndevice: cpu\nlog_every: 1\n"
                 f"stop_window: 0\ntv_weight: 0\n{extra}")
    return m


def _preview(m: Path, *more: str):
    return cli("preview", str(m), "--size", "32", "--steps", "10", "--quiet", *more)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _cells(out: Path) -> dict[tuple[str, str], tuple]:
    with sqlite3.connect(out / "previews" / "out" / "ledger.sqlite") as db:
        rows = db.execute("SELECT content, style, state, attempts, recipe FROM pairs").fetchall()
    return {(c, s): (state, attempts, recipe) for c, s, state, attempts, recipe in rows}


def test_preview_end_to_end(folders, tmp_path):
    content, styles, out = folders
    before = {p.name: file_hash(p) for p in content.iterdir()}
    m = _manifest(tmp_path, content, styles, out, 'per_style: {"s2.jpg": {style_weight: 1.5}}\n')
    r = _preview(m)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = out / "previews"
    grid = json.loads((folder / "preview.json").read_text())

    # every sample photo (all 3: the default) x style x strength is a cell on disk
    assert [p["name"] for p in grid["photos"]] == ["square.png", "tall.jpg", "wide.png"]
    assert [s["name"] for s in grid["styles"]] == ["s1.png", "s2.jpg"]
    assert len(_cells(out)) == 3 * 2 * 3 and {v[0] for v in _cells(out).values()} == {"done"}
    # the samples are downscaled copies; the originals are untouched
    for p in grid["photos"]:
        with Image.open(folder / p["image"]) as im:
            assert max(im.size) == 32
    assert {p.name: file_hash(p) for p in content.iterdir()} == before

    base = {"s1.png": 3.0, "s2.jpg": 1.5}  # gatys preset's 3; s2's own per_style 1.5
    for k, st in enumerate(grid["styles"], 1):
        assert (folder / f"style-{k}.html").is_file()
        with Image.open(folder / f"sheet-{k}.jpg") as im:
            assert im.format == "JPEG"
        html = (folder / f"style-{k}.html").read_text()
        weights = [c["weight"] for c in st["columns"]]
        assert weights == pytest.approx([base[st["name"]] * f for f in FACTORS], rel=1e-3)
        for c in st["columns"]:
            # the label, pasted into a manifest, gives that style exactly that weight
            assert c["label"].replace('"', "&#34;") in html
            pasted = tmp_path / "pasted.yaml"
            pasted.write_text(f"content: {content}\nstyles: {styles}\n{c['label']}\n")
            over = {p.style: dict(p.overrides) for p in make_plan(manifest.load(pasted), lambda x: "")}
            assert over[st["name"]] == {"style_weight": c["weight"]}
        for i, p in enumerate(grid["photos"]):
            photo = _pixels(folder / p["image"])
            moved = [np.abs(_pixels(folder / c["outputs"][i]) - photo).mean() for c in st["columns"]]
            assert min(moved) > 1.0, (st["name"], p["name"], moved)  # every cell differs from the photo
            assert moved[0] < moved[1] < moved[2], (st["name"], p["name"], moved)  # stronger moves further
    index = (folder / "index.html").read_text()
    assert "s1.png" in index and "style-2.html" in index

    # the run's own folder has no ledger and no outputs: a preview is not part of the run
    assert not (out / "ledger.sqlite").exists()
    assert sorted(x.name for x in out.iterdir()) == ["previews"]

    # a rerun makes nothing new
    cells = _cells(out)
    made = {q: q.stat().st_mtime_ns for q in (folder / "out").rglob("*.png")}
    r = _preview(m)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _cells(out) == cells
    assert {q: q.stat().st_mtime_ns for q in (folder / "out").rglob("*.png")} == made

    # a new style makes only its own cells
    make_image(styles / "s3.png", 40, 40, 12)
    r = _preview(m)
    assert r.returncode == 0, r.stdout + r.stderr
    now = _cells(out)
    assert {k: v for k, v in now.items() if k in cells} == cells
    assert {s for _, s in now.keys() - cells.keys()} == {"s3.png@0.333", "s3.png@1", "s3.png@3"}
    assert len(now) == 3 * 3 * 3

    # a later run plans exactly the normal pairs, none of the previews'
    r = cli("run", str(m), "--size", "32", "--steps", "3", "--set", "scales=[1.0]", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(out / "ledger.sqlite") as db:
        pairs = set(db.execute("SELECT content, style FROM pairs").fetchall())
    assert pairs == {(c, s) for c in ("square.png", "tall.jpg", "wide.png") for s in ("s1.png", "s2.jpg", "s3.png")}
    assert 'href="previews/index.html"' in (out / "report.html").read_text()  # the run's report links them


def test_named_photos_and_strengths(folders, tmp_path):
    content, styles, out = folders
    m = _manifest(tmp_path, content, styles, out)
    r = _preview(m, "--photo", "tall", "--photo", "wide.png", "--strengths", "0.5,2", "--steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    grid = json.loads((out / "previews" / "preview.json").read_text())
    assert [p["name"] for p in grid["photos"]] == ["tall.jpg", "wide.png"]
    assert [c["weight"] for c in grid["styles"][0]["columns"]] == [1.5, 6.0]
    assert len(_cells(out)) == 2 * 2 * 2


@pytest.mark.parametrize("args, says", [
    (("--set", "style_wieght=3"), "unknown key 'style_wieght'"),
    (("--strengths", "1,-2"), "--strengths"),
    (("--photo", "nope"), "--photo nope"),
    (("--size", "2"), "--size"),
])
def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, args, says):
    content, styles, out = folders
    r = _preview(_manifest(tmp_path, content, styles, out), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_bad_manifest_key_exits_2(folders, tmp_path):
    content, styles, out = folders
    r = _preview(_manifest(tmp_path, content, styles, out, "colour: preserve\n"))
    assert r.returncode == 2 and "unknown key 'colour'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def _flat(path: Path, w: int, h: int, rgb: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), rgb).save(path)
    return path


def test_chosen_photos_differ(tmp_path):
    """Three near-identical dark landscapes, a bright one, a portrait: three picks take one of the dark ones,
    the bright one and the portrait, the same ones every time."""
    files = [_flat(tmp_path / f"dark{i}.png", 40, 30, (30 + i, 30, 30)) for i in range(3)]
    files += [_flat(tmp_path / "bright.png", 40, 30, (240, 240, 230)), _flat(tmp_path / "tall.png", 30, 40, (35, 30, 30))]
    picked = pv.choose(files, 3)
    assert {p.name for p in picked} >= {"bright.png", "tall.png"}
    assert sum(p.name.startswith("dark") for p in picked) == 1
    assert pv.choose(files, 3) == picked
    assert len(pv.choose(files, 10)) == 5


def test_labels_parse_back(tmp_path):
    for name, weight, others in [("a[1]*.jpg", 1e6, ()), ("b.png", 0.1, (("style_size", 1.0), ("colors", "preserve")))]:
        line = pv.label(name, weight, others)
        p = tmp_path / "m.yaml"
        p.write_text(line + "\n")
        s = manifest.load(p)
        (pattern, changes), = s.per_style
        assert dict(changes) == {"style_weight": weight, **dict(others)}
        assert type(dict(changes).get("style_size", 1.0)) is float  # 1.0, a fraction, not 1 pixel
        assert _matches(name, pattern)  # the style itself, and no other name
        assert not any(_matches(other, pattern) for other in ("a1x.jpg", "a[1]x.jpg", "a1.jpg", "bxpng"))


def test_previews_is_a_reserved_output_folder(folders):
    content, styles, out = folders
    s = manifest.Settings(content=content, styles=styles, out=out, name="previews/{style}/{content}")
    with pytest.raises(ConfigError, match="previews/"):
        make_plan(s, lambda p: "")


def test_parse_strengths():
    assert pv.parse_strengths("0.33, 1,3") == (0.33, 1.0, 3.0)
    for bad in ("", "a", "0", "1,1", "inf"):
        with pytest.raises(ConfigError):
            pv.parse_strengths(bad)


def test_help_states_the_preview_defaults():
    """The CLI states them without importing torch (a quick --help): it must say what run/preview.py does."""
    r = cli("preview", "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert f"Default: {pv.SIZE}." in text and f"Default: {pv.STEPS}." in text
    assert "Default: " + ",".join(f"{f:.3g}" for f in pv.STRENGTHS) + "." in text


def test_the_runs_cleanup_leaves_previews_alone(tmp_path):
    """OUT/previews is a run of its own: the run's sweep of dead writers' temporaries does not judge its files."""
    import os
    import time

    from nst_batch.run.lifecycle import remove_stale_temporaries

    theirs = tmp_path / "previews" / "out" / "models" / ".s.pt.999999999-ab12.tmp"
    ours = tmp_path / "models" / ".s.pt.999999999-ab12.tmp"
    for p in (theirs, ours):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(tmp_path, []) == 1
    assert theirs.exists() and not ours.exists()
