"""The `nst-batch` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import cli, make_image
from nst_batch.errors import EXIT_PAIRS_FAILED, EXIT_WEIGHTS

HEADER = "content,style,step,content_loss,style_loss,tv_loss,total_loss,elapsed_s,attempt,px"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # 32 px images: one thread is as fast, and does not spin against other processes on a 2-core machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_run_end_to_end(folders, tmp_path):
    content, styles, out = folders
    # Paths in the manifest are relative to its folder; run it from somewhere else.
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "pipeline.yaml").write_text("content: ../content\nstyles: ../styles\nout: ../out\nsteps: 50\n")
    (tmp_path / "cwd").mkdir()
    r = cli("run", str(conf / "pipeline.yaml"), "--size", "32", "--steps", "3", "--device", "cpu",
            "--set", "log_every=1", "--set", "scales=[1.0]", "--quiet", cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr

    sizes = {"wide": (64, 40), "tall": (36, 60), "square": (48, 48)}
    for style in ("s1", "s2"):
        for name, (w, h) in sizes.items():
            with Image.open(out / style / f"{name}.png") as im:
                assert max(im.size) == 32
                # the content's aspect ratio, within a pixel
                assert abs(im.size[0] - round(32 * w / max(w, h))) <= 1 and abs(im.size[1] - round(32 * h / max(w, h))) <= 1
                assert im.mode == "RGB"
    assert sorted(p.name for p in out.rglob("*.png")) == sorted(f"{n}.png" for n in sizes for _ in range(2))

    text = (out / "losses.csv").read_text()
    assert text.splitlines()[0] == HEADER
    rows = list(csv.DictReader(text.splitlines()))
    pairs = {(c, s) for c in ("square.png", "tall.jpg", "wide.png") for s in ("s1.png", "s2.jpg")}
    assert {(r["content"], r["style"]) for r in rows} == pairs
    assert len(rows) == 6 * 3  # a row per step (log_every=1); the last step's row is the final one
    for pair in pairs:
        mine = [r for r in rows if (r["content"], r["style"]) == pair]
        assert [int(r["step"]) for r in mine] == [1, 2, 3]
        assert {r["px"] for r in mine} == {"32"} and {r["attempt"] for r in mine} == {"1"}
        assert all(float(r["total_loss"]) > 0 for r in mine)


def test_a_bad_pair_fails_alone_with_exit_1(tmp_path):
    content, styles, out = tmp_path / "c", tmp_path / "s", tmp_path / "out"
    make_image(content / "good.png", 40, 30, 1)
    (content / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    make_image(content / "tiny.png", 10, 40, 2)
    make_image(styles / "s.png", 32, 32, 3)
    r = cli("run", "--content", str(content), "--styles", str(styles), "--out", str(out), "--size", "32",
            "--steps", "3", "--device", "cpu", "--set", "layers={content: [relu2_1], style: [relu1_1]}", "--quiet")
    assert r.returncode == EXIT_PAIRS_FAILED, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "s" / "good.png").is_file()
    assert not (out / "s" / "broken.png").exists() and not (out / "s" / "tiny.png").exists()
    assert "unreadable" in r.stdout and "too_small" in r.stdout


def test_missing_weights_exit_3(folders, tmp_path):
    content, styles, out = folders
    missing = tmp_path / "nowhere" / "vgg19.pth"
    r = cli("run", "--content", str(content), "--styles", str(styles), "--out", str(out), "--weights", str(missing),
            "--device", "cpu")
    assert r.returncode == EXIT_WEIGHTS, r.stdout + r.stderr
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [("--help",), ("run", "--help"), ("retry", "--help"), ("status", "--help"),
                                  ("report", "--help"), ("preview", "--help")])
def test_help(args):
    r = cli(*args, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
    if args[0] == "run":
        assert "--set" in r.stdout and "--size" in r.stdout


# User names (folders like "x[/b]" or "[draft]") reach rich's markup parser in report.py and progress.py.
BRACKETED = "x[/b]/bad.jpg"


def test_status_prints_bracketed_names_verbatim():
    import io
    from pathlib import Path

    from rich.console import Console

    from nst_batch.report.status import Summary, print_status

    failures = [{"content": BRACKETED, "style": "[draft].png", "kind": "unreadable",
                 "message": f"{BRACKETED}: not an image", "attempts": 1}]
    summary = Summary({"pending": 0, "running": 0, "done": 0, "failed": 1}, 1, 0.0, None, None, 0.0, failures)
    buf = io.StringIO()
    print_status(Console(file=buf, width=300), Path("out[/x]"), summary)
    text = buf.getvalue()
    assert "out[/x]" in text and BRACKETED in text and "[draft].png" in text


def test_live_display_prints_bracketed_names_verbatim():
    import io

    from rich.console import Console

    from nst_batch.run.progress import LiveDisplay

    buf = io.StringIO()
    d = LiveDisplay(Console(file=buf, force_terminal=True, width=300))
    d.start(2, 0)
    try:
        name = f"[draft].png × {BRACKETED}"
        d.pair_start(name, 10)
        d.step(1, 0.5)
        d.pair_end(name, False, 1.0, f"unreadable: {BRACKETED}: not an image")
        d.pair_end(name, True, 1.0, "ran out of memory at [512] px")
    finally:
        d.close()
    assert BRACKETED in buf.getvalue() and "[draft].png" in buf.getvalue()


def test_skipped_inputs_are_counted_at_the_start_and_named_in_the_report(tmp_path):
    content, styles, out = tmp_path / "c", tmp_path / "s", tmp_path / "c" / "styled"
    make_image(content / "a.png", 32, 24, 1)
    (content / "notes.txt").write_text("not a photo")
    make_image(content / ".hidden.png", 20, 20, 2)
    make_image(styles / "s.png", 32, 32, 3)
    args = ("run", "--content", str(content), "--styles", str(styles), "--out", str(out), "--size", "32",
            "--steps", "3", "--device", "cpu", "--set", "scales=[1.0]",
            "--set", "layers={content: [relu2_1], style: [relu1_1]}", "--quiet")
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 input files skipped: 1 hidden, 1 not an image; report.html names them" in r.stdout
    page = (out / "report.html").read_text()
    assert "notes.txt" in page and ".hidden.png" in page
    r = cli(*args)  # again: the output folder, inside the content folder, now exists and is listed, not read
    assert r.returncode == 0 and "3 input files and folders skipped" in r.stdout and "nothing to do" in r.stdout
    status = json.loads(cli("status", str(out), "--json").stdout)
    assert {(k["path"], k["reason"]) for k in status["skipped"]} == {
        (".hidden.png", "hidden"), ("notes.txt", "not_image"), ("styled/", "output_folder")}


def test_errors_neutralise_control_characters_in_names(tmp_path):
    missing = tmp_path / "\x1b[2J\x1b]0;owned\x07photos"  # would clear the screen and retitle the terminal
    r = cli("run", "--content", str(missing), "--styles", str(tmp_path), "--out", str(tmp_path / "out"),
            "--device", "cpu", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "\\x1b[2J\\x1b]0;owned\\x07photos" in r.stderr and "key 'content'" in r.stderr


def test_an_output_folder_that_cannot_be_made_is_one_line_and_exit_2(tmp_path):
    make_image(tmp_path / "c" / "a.png", 32, 24, 1)
    make_image(tmp_path / "s" / "s.png", 32, 32, 2)
    (tmp_path / "plain-file").write_text("not a folder")
    out = tmp_path / "plain-file" / "results"  # its parent is a file: mkdir fails inside the run
    r = cli("run", "--content", str(tmp_path / "c"), "--styles", str(tmp_path / "s"), "--out", str(out),
            "--size", "32", "--steps", "3", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"cannot use the output folder {out}" in r.stderr
