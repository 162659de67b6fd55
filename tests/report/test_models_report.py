"""Which network made which pair: a tiny run where one style is made by its network and another optimised
(auto), then what the ledger, `status` and the report say of each style's model and of each pair."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from conftest import cli, make_image
from nst_batch.batch.ledger import FILENAME, Ledger
from nst_batch.config.manifest import Settings
from nst_batch.report import build
from nst_batch.batch.methods import BREAK_EVEN
from nst_batch.run import local
from nst_batch.run.progress import Display

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_thread) -> Path:
    """3 photos x 2 styles, `auto` with a break-even of 2: net.png is made by its network (8 steps), kept.png
    (colors: preserve, which a network cannot learn) by optimisation."""
    root = tmp_path_factory.mktemp("models")
    for i in range(3):
        make_image(root / "content" / f"p{i}.png", 40, 32, i)
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = (250, 30, 30)
    stripes[1::4] = (20, 20, 200)
    (root / "styles").mkdir()
    for name in ("net.png", "kept.png"):
        Image.fromarray(stripes).save(root / "styles" / name)
    s = Settings(content=root / "content", styles=root / "styles", out=root / "out", size=32, steps=4, log_every=2,
                 scales=(1.0,), device="cpu", layers=LAYERS, lease_s=30, method="auto", network_steps=8,
                 refine_steps=2, per_style=(("kept.png", (("colors", "preserve"),)),))
    mp = pytest.MonkeyPatch()
    mp.setitem(BREAK_EVEN, "cpu", 2)
    try:
        result = local.run(s, Display(Console(quiet=True)))
    finally:
        mp.undo()
    assert result.made == 6 and result.failed == 0, result.failures
    return s.out


def _model(out: Path) -> dict:
    with Ledger(out, readonly=True) as led:
        return led.models()["net.png"]


def test_each_network_pair_records_the_model_that_made_it(made):
    db = sqlite3.connect(made / FILENAME)
    try:
        rows = db.execute("SELECT style, state, method, model FROM pairs ORDER BY id").fetchall()
    finally:
        db.close()
    model = _model(made)
    assert model["step"] == model["steps"] == 8 and len(model["recipe"]) == 16
    assert sorted(rows) == sorted([("net.png", "done", "network", model["recipe"])] * 3
                                  + [("kept.png", "done", "optimize", None)] * 3)


@pytest.mark.slow  # the CLI in a subprocess
def test_status_shows_each_styles_model(made):
    model = _model(made)
    r = cli("status", str(made))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "net.png" in ln)
    for cell in ("network 3", model["recipe"][:8], "trained 8/8", "│ 3 "):
        assert cell in line, (cell, r.stdout)
    assert "kept.png" not in r.stdout  # no model: no row
    js = json.loads(cli("status", str(made), "--json").stdout)["models"]
    assert [(m["style"], m["recipe"], m["trained"], m["photos"], m["made"], m["methods"]) for m in js] == \
        [("net.png", model["recipe"], True, 3, 3, {"network": 3})]


def test_the_report_shows_the_model_on_its_style_page_and_on_each_pair(made):
    build.write_report(made)
    model = _model(made)
    short = model["recipe"][:8]
    pages = {p.name: p.read_text() for p in (made / "styles").glob("*.html")}
    net = next(t for t in pages.values() if "<b>net.png</b>" in t)
    kept = next(t for t in pages.values() if "<b>kept.png</b>" in t)
    assert f'title="model recipe {model["recipe"]}">{short}</code>' in net
    assert "trained 8 of 8 steps" in net and "on 3 photos" in net and "it made 3 of this style" in net
    assert "the 3 photos it trained on</summary>" in net and "p0.png, p1.png, p2.png" in net
    assert 'aria-label="training loss over steps"' in net
    assert net.count(f" s · model {short}<br>") == 3  # each card: network · attempts · steps · seconds · model
    assert "model " not in kept.split('<div class="cards">')[1] and "network" not in kept
    rows = list(csv.DictReader(io.StringIO((made / "summary.csv").read_text())))
    assert sorted((r["style"], r["method"], r["model"]) for r in rows) == sorted(
        [("net.png", "network", model["recipe"])] * 3 + [("kept.png", "optimize", "")] * 3)
