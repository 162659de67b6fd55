"""`nst-batch run --ray`: the Ray driver on a real local Ray cluster (2 CPUs, a small object store), with
real actors killed under it. Skipped when Ray is not installed, except the test of that very message.

Drivers run as `nst-batch` subprocesses connected to the cluster this module starts, so a test can
SIGKILL them; actors are found as this process's descendants titled `ray::EngineWorker.make` (Ray
names a worker process after the call it runs), so only our own processes are ever killed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, cli, make_image

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them

FAST = ["--device", "cpu", "--size", "48", "--set", "scales=[1.0]", "--set", "stop_window=0", "-q"]


def driver(folders, address: str, *extra: str) -> list[str]:
    content, styles, out = folders
    return ["run", "--content", str(content), "--styles", str(styles), "--out", str(out), *FAST,
            "--ray", address, *extra]


def popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "nst_batch.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def count_done(out: Path) -> None:
    """A trigger that logs every transition to done: 'done exactly once' is then a count."""
    from nst_batch.batch.ledger import Ledger

    Ledger(out).close()  # the schema, as a run would create it
    db = sqlite3.connect(out / "ledger.sqlite")
    db.executescript("CREATE TABLE done_log (pair_id INTEGER);"
                     "CREATE TRIGGER log_done AFTER UPDATE OF state ON pairs WHEN NEW.state = 'done' "
                     "BEGIN INSERT INTO done_log VALUES (NEW.id); END;")
    db.close()


def ledger_rows(out: Path) -> dict[int, tuple[str, int]]:
    db = sqlite3.connect(out / "ledger.sqlite", timeout=30)
    try:
        return {i: (state, attempts) for i, state, attempts in db.execute("SELECT id, state, attempts FROM pairs")}
    finally:
        db.close()


def done_counts(out: Path) -> dict[int, int]:
    db = sqlite3.connect(out / "ledger.sqlite", timeout=30)
    try:
        return dict(db.execute("SELECT pair_id, COUNT(*) FROM done_log GROUP BY pair_id").fetchall())
    finally:
        db.close()


def descendants_titled(prefix: bytes) -> list[int]:
    """PIDs of this process's descendants whose command line starts with `prefix`."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
                parent[int(p)] = int(stat.rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    mine = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in mine and pid not in mine:
                mine.add(pid)
                changed = True
    found = []
    for pid in mine - {os.getpid()}:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix):
                found.append(pid)
        except OSError:
            pass
    return found


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended before {what}: rc {proc.returncode}\n{proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def temporaries(out: Path) -> list[Path]:
    return list(out.rglob("*.tmp"))


def each_done_once(out, n: int = 6) -> dict:
    """The ledger's rows, once every one of the n pairs is done, each recorded done exactly once
    (the trigger count_done installed)."""
    rows = ledger_rows(out)
    assert len(rows) == n and all(state == "done" for state, _ in rows.values()), rows
    assert done_counts(out) == {i: 1 for i in rows}
    return rows


def test_an_actor_killed_mid_pair_costs_that_pair_one_attempt(folders, ray_address):
    out = folders[2]
    count_done(out)
    proc = popen(driver(folders, ray_address, "--steps", "20", "--ray-workers", "2"))
    try:
        victim = wait_for(lambda: descendants_titled(b"ray::EngineWorker.make"), 180, "an actor computing", proc)[0]
        os.kill(victim, signal.SIGKILL)
        text, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, text
    rows = each_done_once(out)
    # The pair it was computing was claimed twice; the one queued behind it never began: not counted.
    assert sorted(a for _, a in rows.values()) == [1, 1, 1, 1, 1, 2], rows
    assert not temporaries(out)
    assert len(list(out.rglob("*.png"))) == 6


def test_a_killed_driver_is_taken_over_at_once_and_only_its_in_flight_pairs_are_redone(folders, ray_address):
    out = folders[2]
    count_done(out)
    # lease_s of an hour: finishing at all proves the dead driver's claims were not waited out.
    args = driver(folders, ray_address, "--steps", "20", "--ray-workers", "2", "--set", "lease_s=3600")
    proc = popen(args)
    try:
        def some_done_some_running():
            states = [s for s, _ in ledger_rows(out).values()] if (out / "ledger.sqlite").is_file() else []
            return "done" in states and "running" in states

        wait_for(some_done_some_running, 180, "a pair done and one running", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    before = ledger_rows(out)
    in_flight = {i for i, (s, _) in before.items() if s == "running"}
    assert in_flight and len(in_flight) < 6
    again = cli(*args, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = ledger_rows(out)
    assert all(s == "done" for s, _ in rows.values()), rows
    assert done_counts(out) == {i: 1 for i in rows}
    for i, (_, attempts) in rows.items():
        # Done before the kill: left alone. In flight: claimed once more. Pending: claimed once.
        state, before_attempts = before[i]
        assert attempts == before_attempts + (state != "done"), (i, before[i], attempts)
    assert {i for i, (_, a) in rows.items() if a == 2} == in_flight
    assert not temporaries(out)


def test_ray_local_with_one_cpu_actor_makes_the_pixels_of_a_plain_run(folders, tmp_path):
    """The actor runs torch on 1 thread; so does the plain run here (OMP_NUM_THREADS=1): same sums in the
    same order, so the same bytes, not merely close ones."""
    pytest.importorskip("ray")
    content, styles, _ = folders
    plain, viaray = tmp_path / "plain", tmp_path / "ray"
    common = ["--content", str(content), "--styles", str(styles), *FAST, "--steps", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.run([sys.executable, "-m", "nst_batch.cli", "run", *common, "--out", str(plain)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
    assert a.returncode == 0, a.stdout + a.stderr
    b = cli("run", *common, "--out", str(viaray), "--ray", "local", "--ray-workers", "1", timeout=240)
    assert b.returncode == 0, b.stdout + b.stderr
    made = sorted(p.relative_to(plain) for p in plain.rglob("*.png"))
    assert len(made) == 6
    for rel in made:
        x, y = (np.asarray(Image.open(d / rel)) for d in (plain, viaray))
        assert np.array_equal(x, y), rel


def test_a_hung_actor_is_killed_and_a_pair_lost_three_times_fails_as_worker_lost(tmp_path, ray_address):
    content, styles, out = tmp_path / "c", tmp_path / "s", tmp_path / "out"
    make_image(content / "a.png", 48, 48, 1)
    make_image(styles / "s.png", 48, 48, 2)
    # 100,000 steps never end in the 2 s the pair is given.
    r = cli("run", "--content", str(content), "--styles", str(styles), "--out", str(out), *FAST,
            "--steps", "100000", "--ray", ray_address, "--ray-workers", "1", "--ray-pair-timeout", "2", timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    db = sqlite3.connect(out / "ledger.sqlite")
    state, kind, msg, attempts = db.execute("SELECT state, error_kind, error_message, attempts FROM pairs").fetchone()
    db.close()
    assert (state, kind, attempts) == ("failed", "worker_lost", 3), msg
    assert "pair_timeout_s=2" in msg
    assert not temporaries(out)


def test_auto_on_ray_keeps_the_pairs_a_local_run_made_with_a_network(tmp_path, ray_address):
    """Under auto, a style with 2 photos optimises its pending pairs, but a pair a local run's network made is
    done under the network's recipe and kept: a plain plan would send it back to pending and make it again."""
    from rich.console import Console

    from nst_batch.run import local
    from nst_batch.config.manifest import Settings
    from nst_batch.run.progress import Display

    content, styles, out = tmp_path / "c", tmp_path / "s", tmp_path / "out"
    for i in range(2):
        make_image(content / f"p{i}.png", 48, 32, 20 + i)
    stripes = np.zeros((48, 48, 3), np.uint8)  # far from the photos, as a painting is
    stripes[::4] = (250, 30, 30)
    stripes[1::4] = (20, 20, 200)
    styles.mkdir()
    Image.fromarray(stripes).save(styles / "s.png")
    # What FAST and --steps set (the driver runs in the repository, beside its pipeline.yaml), so the Ray run's
    # recipes are these.
    s = Settings(content=content, styles=styles, out=out, size=48, scales=(1.0,), stop_window=0, device="cpu",
                 steps=40, method="network", network_steps=2, refine_steps=4)
    assert local.run(s, Display(Console(quiet=True))).made == 2

    def rows():
        db = sqlite3.connect(out / "ledger.sqlite")
        try:
            return db.execute("SELECT content, state, recipe, method, finished_at FROM pairs ORDER BY id").fetchall()
        finally:
            db.close()

    before = rows()
    assert [r[1:2] + r[3:4] for r in before] == [("done", "network")] * 2
    # The same run, on Ray, with method auto (the default): network_steps and refine_steps as they were (they
    # are the network pairs' recipe).
    r = cli(*driver((content, styles, out), ray_address, "--ray-workers", "1", "--steps", "40", "--set",
                    "network_steps=2", "--set", "refine_steps=4"), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows() == before


def test_a_second_driver_on_the_same_output_folder_is_refused(folders, tmp_path):
    pytest.importorskip("ray")
    out = folders[2]
    out.mkdir()
    fd = os.open(out / ".nst-ray-driver.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"otherhost:4242")
        r = cli(*driver(folders, "127.0.0.1:1"))  # refused before any connection is tried
    finally:
        os.close(fd)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "another Ray driver (otherhost:4242) is running on" in lines[0], r.stderr
    assert not (out / "ledger.sqlite").exists()


def test_without_ray_the_option_says_how_to_install_it(folders, tmp_path):
    blocker = tmp_path / "block" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray (blocked by the test)')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "nst_batch.cli", *driver(folders, "local")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --ray needs Ray, an optional extra: pip install 'nst-batch[ray]'"]
    assert not folders[2].exists()
