"""Overnight-safe runs, end to end through the CLI in subprocesses: kill -9 and resume,
Ctrl-C / SIGTERM, two workers on one folder, failures that stay local, what a second run redoes,
exit codes, and `status` while a run is going.

Tiny images (<= 64 px), --size 32, a few steps: each `run` costs mostly its start (torch + VGG19).
Every command runs in its own temporary folder, so the repository's pipeline.yaml is not read.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nst_batch.batch.ledger import Finished, Ledger
from nst_batch.config.manifest import Settings
from nst_batch.batch.plan import make_plan

from conftest import make_image

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
FAST = ("--size", "32", "--steps", "3", "--device", "cpu", "--quiet")
LOSS_FIELDS = 10


def _default_signals() -> None:
    # As from a terminal: a child of a non-interactive shell may inherit SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def nst(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nst_batch.cli", *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_default_signals)


def start(*args: str, cwd: Path, script: Path | None = None) -> subprocess.Popen:
    """`nst-batch ARGS` in the background; with `script`, through that wrapper of the CLI instead."""
    cmd = [str(script)] if script else ["-m", "nst_batch.cli"]
    return subprocess.Popen([sys.executable, *cmd, *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def run_args(content: Path, styles: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("run", "--content", str(content), "--styles", str(styles), "--out", str(out), *FAST, *extra)


def ledger_rows(out: Path) -> dict[tuple[str, str], dict]:
    """The ledger as plain dicts, read with a connection of our own (as a second process would)."""
    db = sqlite3.connect(out / "ledger.sqlite", timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return {(r["content"], r["style"]): dict(r) for r in db.execute("SELECT * FROM pairs")}
    finally:
        db.close()


def poll(out: Path, until, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Ledger rows as soon as `until(rows)` holds; fails if the process ends or time runs out first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (out / "ledger.sqlite").exists():
            try:
                rows = ledger_rows(out)
            except sqlite3.OperationalError:  # the schema is not there yet
                rows = {}
            if rows and until(rows):
                return rows
        if proc.poll() is not None:
            o, e = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the awaited state:\n{o}\n{e}")
        time.sleep(0.02)
    pytest.fail("timed out waiting for the ledger")


def n_state(rows: dict, state: str) -> int:
    return sum(r["state"] == state for r in rows.values())


def check_outputs(out: Path, rows: dict) -> list[list[str]]:
    """Every done pair's image decodes, no temporary file is left (not even a kill -9'd writer's),
    losses.csv parses with 10 fields a row."""
    for r in rows.values():
        if r["state"] == "done":
            with Image.open(out / r["output"]) as im:
                im.load()
                assert im.mode == "RGB" and max(im.size) == 32
    left = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"temporary files left in OUT: {left}"
    with open(out / "losses.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["content", "style", "step", "content_loss", "style_loss", "tv_loss", "total_loss",
                        "elapsed_s", "attempt", "px"]
    assert all(len(row) == LOSS_FIELDS for row in table), [row for row in table if len(row) != LOSS_FIELDS]
    for row in table[1:]:
        [float(x) for x in row[2:]]
    return table[1:]


def reap(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture
def grid(tmp_path: Path):
    """A content and a style folder; returns a function that fills them."""

    def make(n_content: int, n_styles: int, w: int = 48, h: int = 40):
        content, styles = tmp_path / "content", tmp_path / "styles"
        for i in range(n_content):
            make_image(content / f"c{i}.png", w - 4 * i, h + 4 * i, i)
        for j in range(n_styles):
            make_image(styles / f"s{j}.png", 40, 40, 100 + j)
        return content, styles, tmp_path / "out"

    return make


# -- kill -9, Ctrl-C, SIGTERM ------------------------------------------------------------------------


def test_kill_9_mid_run_then_resume_makes_every_pair_once(grid, tmp_path):
    content, styles, out = grid(4, 2)
    # A long lease: only the dead-pid check can free the killed worker's claim at once.
    args = run_args(content, styles, out, "--steps", "5", "--set", "lease_s=600")
    p = start(*args, cwd=tmp_path)
    try:
        poll(out, lambda rows: n_state(rows, "done") >= 1 and n_state(rows, "running") >= 1, p)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)  # reaped: a zombie would still look alive to the next run
    finally:
        reap(p)
    assert p.returncode == -signal.SIGKILL
    killed = ledger_rows(out)
    done_before = {k: r for k, r in killed.items() if r["state"] == "done"}
    assert done_before and n_state(killed, "running") >= 1

    r = nst(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = ledger_rows(out)
    assert len(rows) == 8 and n_state(rows, "done") == 8
    for k, row in done_before.items():  # not redone
        assert (row["finished_at"], row["attempts"]) == (rows[k]["finished_at"], rows[k]["attempts"])
    assert all(row["attempts"] in (1, 2) for row in rows.values())
    table = check_outputs(out, rows)
    # Each pair's image came from the attempt the ledger names, and that attempt logged one final row.
    finals = {(c, s, int(a)) for c, s, *_, a, _px in table}
    assert all((c, s, row["attempts"]) in finals for (c, s), row in rows.items())


def _interrupt(args, out: Path, cwd: Path, sig: int, at_once: bool = False) -> tuple[subprocess.Popen, str, str]:
    """Start a run and send `sig` while its first pair is being made: once the pair's heartbeat has
    beaten (the worker is well inside the pair), or, with at_once, as soon as the claim shows."""
    p = start(*args, cwd=cwd)
    try:
        seen = poll(out, lambda rows: any(r["state"] == "running" and (at_once or r["heartbeat"] > r["started_at"])
                                          for r in rows.values()), p)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        reap(p)
    [key] = [k for k, r in seen.items() if r["state"] == "running"]
    return p, key, err


def test_sigint_then_sigterm_put_the_pair_back_and_a_third_run_finishes(grid, tmp_path):
    content, styles, out = grid(2, 1)
    # A heartbeat a second; no early stop and 120 steps a scale, so the first pair lasts seconds past its
    # first beat (with 30 it once ended between the beat the test waits for and the signal: under load,
    # and with the batched L-BFGS, whose steps cost less host time).
    args = run_args(content, styles, out, "--steps", "120", "--set", "lease_s=4", "--set", "stop_window=0")

    p, key, err = _interrupt(args, out, tmp_path, signal.SIGINT)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if "resume" in line]
    assert len(hint) == 1 and "run the same command again" in hint[0], err
    rows = ledger_rows(out)
    assert n_state(rows, "running") == 0
    assert rows[key]["state"] == "pending" and rows[key]["worker"] is None and rows[key]["attempts"] == 1

    p, key2, err = _interrupt(args, out, tmp_path, signal.SIGTERM)
    assert p.returncode == 143, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "resume" in line]) == 1, err
    rows = ledger_rows(out)
    assert n_state(rows, "running") == 0 and rows[key2]["state"] == "pending"
    assert key2 == key and rows[key]["attempts"] == 2  # the same (first) pair, its attempts counted

    r = nst(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = ledger_rows(out)
    assert n_state(rows, "done") == 2 and rows[key]["attempts"] == 3
    check_outputs(out, rows)


# -- two workers, and status while they work ---------------------------------------------------------

# The CLI, except that a worker's first pair is recorded only once another worker holds a pair: each of
# two workers started together then makes some, however the machine schedules their starts.
_MEET = """
import time
from nst_batch.batch import ledger
real = ledger.Ledger.done
def done(self, made):
    end = time.monotonic() + 200
    while time.monotonic() < end and not self.db.execute(
            "SELECT 1 FROM pairs WHERE worker IS NOT NULL AND worker != ?", (made.worker,)).fetchone():
        time.sleep(0.05)
    return real(self, made)
ledger.Ledger.done = done
from nst_batch.cli import app
app(prog_name="nst-batch")
"""


def test_two_workers_share_one_folder_then_a_second_run_redoes_exactly_what_changed(grid, tmp_path):
    """Two workers on one folder, both making pairs, `status` while they work; then a deleted output,
    a changed style and a changed setting, each redoing exactly the pairs it affects."""
    content, styles, out = grid(3, 2)
    args = run_args(content, styles, out, "--set", "lease_s=30")
    (tmp_path / "meet.py").write_text(_MEET)
    procs = [start(*args, cwd=tmp_path, script=tmp_path / "meet.py") for _ in range(2)]
    try:
        poll(out, lambda rows: n_state(rows, "running") >= 1, procs[0])
        st = nst("status", out, "--json", cwd=tmp_path, timeout=60)  # a read of the ledger, while they work
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        reap(*procs)
    assert st.returncode == 0, st.stderr
    summary = json.loads(st.stdout)
    assert summary["total"] == 6 and sum(summary["counts"].values()) == 6
    assert [p.returncode for p in procs] == [0, 0], results

    rows = ledger_rows(out)
    assert n_state(rows, "done") == 6
    assert {r["attempts"] for r in rows.values()} == {1}  # no pair made twice
    host = socket.gethostname()
    assert {r["worker"] for r in rows.values()} == {f"{host}:{p.pid}" for p in procs}  # both made pairs
    table = check_outputs(out, rows)
    # one final full-size loss row per pair, no more (steps < log_every; coarse scales log their own last step)
    assert sorted((c, s) for c, s, *_, px in table if px == "32") == sorted(rows)

    first = rows
    (out / first[("c0.png", "s0.png")]["output"]).unlink()  # a deleted output
    make_image(styles / "s1.png", 40, 40, 555)  # a changed style: same name, other pixels
    r = nst(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    second = ledger_rows(out)
    redone = {k for k in first if second[k]["finished_at"] != first[k]["finished_at"]}
    assert redone == {("c0.png", "s0.png")} | {(f"c{i}.png", "s1.png") for i in range(3)}
    assert all(second[k]["attempts"] == (2 if k in redone else 1) for k in first)

    r = nst(*args, "--steps", "4", cwd=tmp_path)  # a setting that changes pixels: everything again
    assert r.returncode == 0, r.stdout + r.stderr
    third = ledger_rows(out)
    assert all(third[k]["finished_at"] != second[k]["finished_at"] for k in first)
    assert all(row["state"] == "done" and row["steps"] in (4, 8) for row in third.values())  # 4 a scale, 1 or 2 scales
    check_outputs(out, third)


# -- a worker with other settings -----------------------------------------------------------------

# The CLI, except that after its first pair the worker touches GATE.waiting and waits for the file GATE
# (named first on the command line) before it claims another: until then it is live, heartbeat going,
# as a worker busy with a long pair would be, and the ledger stays as it is.
_HOLD = """
import sys, time
from pathlib import Path
from nst_batch.batch import ledger
gate = Path(sys.argv.pop(1))
real = ledger.Ledger.claim
calls = [0]
def claim(self, *a, **kw):
    calls[0] += 1
    if calls[0] == 2:
        gate.with_suffix(".waiting").touch()
        while not gate.exists():
            time.sleep(0.05)
    return real(self, *a, **kw)
ledger.Ledger.claim = claim
from nst_batch.cli import app
app(prog_name="nst-batch")
"""


def unbeaten(rows: dict) -> dict:
    return {k: {**r, "heartbeat": None} for k, r in rows.items()}


def test_a_worker_with_other_settings_is_refused_while_one_is_live(grid, tmp_path):
    """Worker A at --size 32; B on the same folder at --size 48 (or another precision, as a CPU worker
    beside a CUDA one would have) would send A's pairs back to pending under its own recipe, and A
    would make them its way, recorded under B's. B is refused with exit 2 and one line; A is untouched."""
    content, styles, out = grid(3, 1)
    gate = tmp_path / "go"
    (tmp_path / "hold.py").write_text(_HOLD)
    args = run_args(content, styles, out, "--set", "lease_s=30")
    a = start(gate, *args, cwd=tmp_path, script=tmp_path / "hold.py")
    try:
        before = poll(out, lambda rows: gate.with_suffix(".waiting").exists(), a)
        for extra, said in ((("--size", "48"), "size 48 here vs 32 there"),
                            (("--set", "precision=bf16"), "precision bf16 here vs fp32 there")):
            b = nst(*args, *extra, cwd=tmp_path)
            lines = b.stderr.strip().splitlines()
            assert b.returncode == 2 and len(lines) == 1, b.stdout + b.stderr
            assert f"another worker ({socket.gethostname()}:{a.pid}) is running on {out}" in lines[0], lines
            assert f"different settings: {said}; wait for it to finish" in lines[0], lines
            assert unbeaten(ledger_rows(out)) == unbeaten(before)  # not a pair touched (but A's heartbeat)
        gate.touch()
        o, e = a.communicate(timeout=240)
    finally:
        reap(a)
    assert a.returncode == 0, o + e
    rows = ledger_rows(out)
    s = Settings(content=content, styles=styles, out=out, size=32, steps=3, device="cpu", precision="fp32",
                 scales=(0.5, 1.0), lease_s=30)  # resolved as a CPU run resolves auto at 32 px
    assert {(p.content, p.style): p.recipe for p in make_plan(s)} == {k: r["recipe"] for k, r in rows.items()}
    assert n_state(rows, "done") == 3
    check_outputs(out, rows)  # every image 32 px: A's

    b = nst(*args, "--size", "48", cwd=tmp_path)  # A is gone: B may start, and redoes everything its way
    assert b.returncode == 0, b.stdout + b.stderr
    assert all(r["state"] == "done" and r["attempts"] == 2 for r in ledger_rows(out).values())


def test_one_line_per_pair_in_a_log_whatever_the_width(tmp_path):
    """Off a terminal rich wraps at the console width: a long name split "[1/1] done ... in" / "1.2s"."""
    content, styles, out = tmp_path / "content", tmp_path / "styles", tmp_path / "out"
    name = "a_long_photo_name_straight_from_the_camera_roll_2024-06-01_18-42-07_IMG_4711.png"
    make_image(content / name, 40, 36, 1)
    make_image(styles / "s.png", 40, 40, 2)
    r = nst(*run_args(content, styles, out), cwd=tmp_path, env={**ENV, "COLUMNS": "40"})
    assert r.returncode == 0, r.stdout + r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(done) == 1 and re.fullmatch(rf"\[1/1\] done s\.png × {re.escape(name)} in \d+\.\ds", done[0]), \
        r.stdout


# -- failures stay local -----------------------------------------------------------------------------


def test_bad_inputs_fail_alone_and_retry_reruns_only_them(tmp_path):
    content, styles, out = tmp_path / "content", tmp_path / "styles", tmp_path / "out"
    make_image(content / "good.png", 48, 40, 1)
    make_image(content / "blocked.png", 40, 48, 2)  # its output path will be a directory
    make_image(tmp_path / "real.jpg", 64, 64, 3)
    real_jpeg = (tmp_path / "real.jpg").read_bytes()
    (content / "corrupt.jpg").write_bytes(os.urandom(3000))
    (content / "empty.png").write_bytes(b"")
    (content / "truncated.jpg").write_bytes(real_jpeg[: len(real_jpeg) // 2])
    (content / "text.jpg").write_text("these are not the pixels you are looking for\n")
    make_image(content / "tiny.png", 10, 10, 4)
    make_image(styles / "s.png", 40, 40, 5)
    (out / "s" / "blocked.png").mkdir(parents=True)  # os.replace onto a directory fails, even for root
    args = run_args(content, styles, out)

    r = nst(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    rows = {c: row for (c, _), row in ledger_rows(out).items()}
    assert rows["good.png"]["state"] == "done"
    expect = {"corrupt.jpg": "unreadable", "empty.png": "unreadable", "truncated.jpg": "unreadable",
              "text.jpg": "unreadable", "tiny.png": "too_small", "blocked.png": "write"}
    assert {c: (row["state"], row["error_kind"]) for c, row in rows.items() if c != "good.png"} == \
        {c: ("failed", kind) for c, kind in expect.items()}
    for name in expect:
        assert name in rows[name]["error_message"] or name in rows[name]["error_message"].replace("\\", "/"), \
            rows[name]["error_message"]
    assert "nst-batch retry" in r.stdout  # the summary says how to re-run them
    check_outputs(out, ledger_rows(out))

    st = nst("status", out, "--json", cwd=tmp_path, timeout=60)
    assert st.returncode == 0, st.stderr
    summary = json.loads(st.stdout)
    assert summary["counts"] == {"pending": 0, "running": 0, "done": 1, "failed": 6}
    assert {f["content"]: f["kind"] for f in summary["failures"]} == expect

    # retry: only the failed pairs run again; with the directory gone the write now succeeds.
    (out / "s" / "blocked.png").rmdir()
    good = rows["good.png"]
    r = nst("retry", out, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {c: row for (c, _), row in ledger_rows(out).items()}
    assert (rows["good.png"]["finished_at"], rows["good.png"]["attempts"]) == (good["finished_at"], 1)
    assert rows["blocked.png"]["state"] == "done" and rows["blocked.png"]["attempts"] == 2
    for name in expect.keys() - {"blocked.png"}:
        assert (rows[name]["state"], rows[name]["attempts"]) == ("failed", 2), name

    # A good image in place of the corrupt one: a plain `run` sees the new bytes and makes that pair only.
    make_image(content / "corrupt.jpg", 48, 48, 6)
    r = nst(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    after = {c: row for (c, _), row in ledger_rows(out).items()}
    assert after["corrupt.jpg"]["state"] == "done" and after["corrupt.jpg"]["attempts"] == 3
    for name, row in rows.items():
        if name != "corrupt.jpg":
            assert (after[name]["state"], after[name]["attempts"]) == (row["state"], row["attempts"]), name
    check_outputs(out, ledger_rows(out))


# -- exit codes ----------------------------------------------------------------------------------------


def test_exit_code_2_for_manifest_and_folder_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("size: 32\nstpes: 3\n")
    r = nst("run", tmp_path / "bad.yaml", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "stpes" in r.stderr and "steps" in r.stderr and "Traceback" not in r.stderr
    r = nst("run", "--content", tmp_path / "nowhere", "--styles", tmp_path, "--out", tmp_path / "out", *FAST,
            cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    r = nst("status", tmp_path / "out", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "no run ledger" in r.stderr


# -- gaps these tests found in the runner (fixed in d702aa0) ------------------------------------------


def _ledger_all_done(tmp_path: Path, n: int = 2) -> tuple[Settings, Path, Path]:
    """An output folder whose ledger says every pair is done, as `run` with FAST options leaves it,
    made without VGG: the CLI then has nothing to compute."""
    content, styles, out = tmp_path / "content", tmp_path / "styles", tmp_path / "out"
    for i in range(n):
        make_image(content / f"c{i}.png", 40, 36, i)
    make_image(styles / "s.png", 40, 40, 9)
    s = Settings(content=content, styles=styles, out=out, size=32, steps=3, device="cpu",
                 precision="fp32", scales=(0.5, 1.0))  # what `run` records on a CPU for precision/scales: auto
    led = Ledger(out)
    try:
        led.sync(make_plan(s), out, s.lease_s)
        led.set_meta("settings", s.to_dict())
        while (r := led.claim("w:1", 60)) is not None:
            make_image(out / r.output, 32, 29, r.id)
            led.done(Finished(r.id, "w:1", 3, 1.0, 1.0, 1.0, 3.0))
    finally:
        led.close()
    return s, content, styles


def test_stale_temporary_files_of_a_killed_worker_are_removed(tmp_path):
    """Only nst-batch's own: a user's `.notes.123.tmp` in OUT looks the same but is not ours."""
    s, content, styles = _ledger_all_done(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [s.out / "s" / f".c0.png.{dead.pid}.tmp", s.out / f".losses.csv.{dead.pid}.tmp",
             s.out / f".report.html.{dead.pid}-0a1b2c3d.tmp", s.out / "thumbs" / f".o-0123456789abcdef.jpg.{dead.pid}.tmp"]
    users = [s.out / f".notes.{dead.pid}.tmp", s.out / "s" / f".draft.png.{dead.pid}.tmp",
             s.out / "mine" / f".c0.png.{dead.pid}.tmp"]
    for p in stale + users:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half an image")
    r = nst(*run_args(content, styles, s.out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to do" in r.stdout
    assert not [p for p in stale if p.exists()]
    assert all(p.read_bytes() == b"half an image" for p in users)


def test_retry_makes_a_failed_pair_whose_input_was_replaced(tmp_path):
    s, content, styles = _ledger_all_done(tmp_path)
    led = Ledger(s.out)
    try:  # c1 failed as unreadable, back when it was a corrupt file
        led.db.execute("UPDATE pairs SET state='failed', error_kind='unreadable', error_message='c1.png: x', "
                       "recipe='0000' WHERE content='c1.png'")
    finally:
        led.close()
    (s.out / "s" / "c1.png").unlink()
    r = nst("retry", s.out, cwd=tmp_path)
    rows = ledger_rows(s.out)
    assert rows[("c1.png", "s.png")]["state"] == "done", r.stdout + r.stderr
    assert r.returncode == 0


_SLOW_SECOND_PAIR = """
import time, torch
real = torch.optim.LBFGS.step
calls = [0]
def step(self, closure):
    calls[0] += 1
    if calls[0] == 2:
        time.sleep(5)  # the second pair's optimisation outlasts the 2 s lease
    return real(self, closure)
torch.optim.LBFGS.step = step
from nst_batch.cli import app
app(prog_name="nst-batch")
"""


def test_a_written_pair_is_never_free_for_another_worker_to_claim(grid, tmp_path):
    content, styles, out = grid(2, 1)
    lease = 2.0  # heartbeats every second
    (tmp_path / "slow_second_pair.py").write_text(_SLOW_SECOND_PAIR)
    p = subprocess.Popen([sys.executable, str(tmp_path / "slow_second_pair.py"),
                          *run_args(content, styles, out, "--set", f"lease_s={lease}")],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while p.poll() is None:
            now = time.time()
            try:
                rows = ledger_rows(out) if (out / "ledger.sqlite").exists() else {}
            except sqlite3.OperationalError:
                rows = {}
            for row in rows.values():
                written = (out / row["output"]).is_file()
                if row["state"] == "running" and written and (row["heartbeat"] or 0) < now - lease:
                    pytest.fail(f"{row['content']}: written, yet free to claim (heartbeat "
                                f"{now - (row['heartbeat'] or 0):.1f} s old, lease {lease} s)")
            time.sleep(0.05)
    finally:
        reap(p)
    assert p.returncode == 0


_SIGNAL_AFTER_CLAIM = """
import os, signal
from nst_batch.batch import ledger
real = ledger.Ledger.claim
def claim(self, *a, **kw):
    row = real(self, *a, **kw)
    if row is not None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C the instant the claim is committed
    return row
ledger.Ledger.claim = claim
from nst_batch.cli import app
app(prog_name="nst-batch")
"""


def test_sigint_as_a_claim_is_committed_puts_the_pair_back(grid, tmp_path):
    content, styles, out = grid(1, 1)
    (tmp_path / "sigint_after_claim.py").write_text(_SIGNAL_AFTER_CLAIM)
    r = subprocess.run([sys.executable, str(tmp_path / "sigint_after_claim.py"),
                        *run_args(content, styles, out, "--set", "lease_s=600")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 130, r.stdout + r.stderr
    assert [row["state"] for row in ledger_rows(out).values()] == ["pending"]


def test_a_weights_typo_leaves_finished_pairs_done(tmp_path):
    s, content, styles = _ledger_all_done(tmp_path)
    before = ledger_rows(s.out)
    r = nst(*run_args(content, styles, s.out, "--weights", "nope.pth"), cwd=tmp_path)
    assert r.returncode == 3 and "nope.pth" in r.stderr
    assert ledger_rows(s.out) == before  # not reset to pending by the settings the failed run asked for


def test_retry_with_an_override_touches_only_the_failed_pairs(tmp_path):
    s, content, styles = _ledger_all_done(tmp_path)
    led = Ledger(s.out)
    try:
        led.db.execute("UPDATE pairs SET state='failed', error_kind='oom', error_message='x' WHERE content='c1.png'")
        stored = led.get_meta("settings")
    finally:
        led.close()
    before = ledger_rows(s.out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = nst("retry", s.out, "--kind", "oom", "--size", "40", cwd=elsewhere)  # from another directory
    assert r.returncode == 0, r.stdout + r.stderr
    after = ledger_rows(s.out)
    assert after[("c0.png", "s.png")] == before[("c0.png", "s.png")]  # the done pair: untouched
    assert after[("c1.png", "s.png")]["state"] == "done"
    with Image.open(s.out / after[("c1.png", "s.png")]["output"]) as im:
        assert max(im.size) == 40  # made with the override
    led = Ledger(s.out)
    try:
        assert led.get_meta("settings") == stored  # a later plain `run` still compares against the manifest's
    finally:
        led.close()
