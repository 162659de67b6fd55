"""Shard mode (`--shard K/N`, SLURM arrays, Kubernetes indexed Jobs): every pair made once over all
shards, each shard resumable on its own, and status/retry reading the union."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli, make_image
from nst_batch.batch import shards
from nst_batch.errors import ConfigError
from nst_batch.files.decode import scan
from nst_batch.batch.ledger import Ledger, open_ledgers, worker_id
from nst_batch.batch.plan import make_plan
from nst_batch.run.progress import Display
from nst_batch.run.local import run
from nst_batch.batch.shards import Shard, shard_of

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them

COUNT_DONE = """
CREATE TABLE IF NOT EXISTS done_log (content TEXT, style TEXT);
CREATE TRIGGER IF NOT EXISTS count_done AFTER UPDATE OF state ON pairs
WHEN NEW.state = 'done' AND OLD.state != 'done'
BEGIN INSERT INTO done_log VALUES (NEW.content, NEW.style); END;
"""


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def collection(tmp_path):
    """5 photos x 2 styles = 10 pairs, and the options of a quick run on them."""
    content, styles, out = tmp_path / "c", tmp_path / "s", tmp_path / "out"
    for i in range(5):
        make_image(content / f"p{i}.png", 40, 32, i)
    for i in range(2):
        make_image(styles / f"s{i}.png", 40, 40, 10 + i)
    args = ["--content", str(content), "--styles", str(styles), "--out", str(out), "--size", "32",
            "--steps", "3", "--device", "cpu", "--set", "scales=[1.0]", "--quiet"]
    return content, styles, out, args


def settings_of(content: Path, styles: Path, out: Path, **kw):
    """The settings `args` above give (so CLI and in-process runs share one recipe)."""
    from nst_batch.config.manifest import Settings
    return Settings(**{**dict(content=content, styles=styles, out=out, size=32, steps=3, scales=(1.0,),
                              device="cpu"), **kw})


def run_here(settings, *shard: Shard | None, retry: bool = False):
    """The runner in this process: no interpreter and torch start per run (the CLI path is tested too)."""
    return run(settings, Display(_null_console()), retry=retry, shards=shard or (None,))


def names(content: Path, styles: Path) -> set[tuple[str, str]]:
    return {(c.name, s.name) for c in content.iterdir() for s in styles.iterdir()}


def count_done_in(folder: Path) -> None:
    """Make the shard's ledger now (as a run would) and count every transition to done in it."""
    with Ledger(folder) as led:
        led.db.executescript(COUNT_DONE)


def done_log(folder: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(folder / "ledger.sqlite")
    try:
        return db.execute("SELECT content, style FROM done_log").fetchall()
    finally:
        db.close()


# -- which shard, from where -----------------------------------------------------------------------

def test_shard_of_is_sha256_of_the_names_and_stable():
    # Pinned: the assignment must not change between versions or processes (Python's hash() would).
    import hashlib
    d = hashlib.sha256("a.jpg\0b.png".encode()).digest()
    assert shard_of("a.jpg", "b.png", 64) == int.from_bytes(d[:8], "big") % 64
    out = subprocess.run([sys.executable, "-c", "from nst_batch.batch.shards import shard_of; "
                          "print(shard_of('a.jpg', 'b.png', 64))"], capture_output=True, text=True, cwd=ROOT)
    assert int(out.stdout) == shard_of("a.jpg", "b.png", 64)
    spread = {shard_of(f"p{i}.jpg", "s.png", 4) for i in range(100)}
    assert spread == {0, 1, 2, 3}


def test_parse_k_of_n_and_bad_values():
    assert shards.parse("3/64", {}) == Shard(64, 3)
    for bad, says in [("64/64", "--shard"), ("-1/4", "--shard"), ("1/0", "--shard"), ("1-4", "--shard"),
                      ("a/4", "--shard")]:
        with pytest.raises(ConfigError, match=says):
            shards.parse(bad, {})


def test_auto_from_slurm_arrays():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "64", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "63", "SLURM_ARRAY_TASK_STEP": "1"}
    assert shards.parse("auto", env) == Shard(64, 5)
    # --array=1-64: the first task is shard 0
    assert shards.parse("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "64",
                                 "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "64"}) == Shard(64, 0)
    # --array=0-14:2 (8 tasks, step 2)
    assert shards.parse("auto", {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "8",
                                 "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "14",
                                 "SLURM_ARRAY_TASK_STEP": "2"}) == Shard(8, 3)
    # --array=1,2,9: not evenly spaced, two tasks would share a shard
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID.*not evenly spaced"):
        shards.parse("auto", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                              "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT"):
        shards.parse("auto", {"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID.*not a whole number"):
        shards.parse("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_auto_from_a_kubernetes_indexed_job():
    assert shards.parse("auto", {"JOB_COMPLETION_INDEX": "7", "NST_SHARD_COUNT": "16"}) == Shard(16, 7)
    with pytest.raises(ConfigError, match="NST_SHARD_COUNT"):
        shards.parse("auto", {"JOB_COMPLETION_INDEX": "7"})
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX: shard index 16"):
        shards.parse("auto", {"JOB_COMPLETION_INDEX": "16", "NST_SHARD_COUNT": "16"})
    with pytest.raises(ConfigError, match="neither SLURM_ARRAY_TASK_ID"):
        shards.parse("auto", {})


def test_cli_auto_from_slurm_env_and_a_bad_value_exit_2(collection):
    content, styles, out, args = collection
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "2"}
    r = subprocess.run([sys.executable, "-m", "nst_batch.cli", "run", *args, "--shard", "auto"], env=env,
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert shards.found(out) == [Shard(2, 1)]
    with open_ledgers(out) as led:
        made = {(r.content, r.style) for r in led.rows()}
    assert made == {p for p in names(content, styles) if shard_of(*p, 2) == 1}
    r = subprocess.run([sys.executable, "-m", "nst_batch.cli", "run", *args, "--shard", "auto"],
                       env={**env, "SLURM_ARRAY_TASK_COUNT": "two"}, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "SLURM_ARRAY_TASK_COUNT" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- every pair exactly once -------------------------------------------------------------------------

def test_four_shards_make_every_pair_exactly_once(collection):
    """Shards 0 and 1 one after the other in this process, 2 and 3 together as subprocesses."""
    content, styles, out, args = collection
    settings = settings_of(content, styles, out)
    for k in range(4):
        count_done_in(Shard(4, k).folder(out))
    for k in (0, 1):
        run_here(settings, Shard(4, k))
    procs = [subprocess.Popen([sys.executable, "-m", "nst_batch.cli", "run", *args, "--shard", f"{k}/4"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (2, 3)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stdout + stderr

    plan = names(content, styles)
    everything = []
    for k in range(4):
        folder = Shard(4, k).folder(out)
        log = done_log(folder)
        assert all(shard_of(*p, 4) == k for p in log), f"shard {k} made another shard's pair"
        everything += log
        assert (folder / "losses.csv").is_file()
        assert Ledger(folder, readonly=True).db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sorted(everything) == sorted(plan)  # each pair once, and the union is the plan
    assert not (out / "ledger.sqlite").exists() and not (out / "losses.csv").exists()
    for c, s in plan:  # images in the usual layout, whatever the shard
        assert (out / Path(s).stem / f"{Path(c).stem}.png").is_file()

    r = cli("status", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["total"] == 10 and summary["counts"]["done"] == 10
    r = cli("status", str(out))
    assert r.returncode == 0 and "10 pairs" in r.stdout and "10 done" in r.stdout
    with open_ledgers(out) as led:
        rows = led.rows()
        assert len({r.id for r in rows}) == 10  # unique ids across shards
        assert {(r.content, r.style) for r in rows} == plan
        assert led.counts()["done"] == 10 and len(led.done_seconds()[0]) == 10
        assert len(led.top_done("seconds", 3)) == 3
        assert led.get_meta("settings")["size"] == 32
        assert len(led.folders) == 4


def _null_console():
    from rich.console import Console
    return Console(file=open(os.devnull, "w"))


def test_report_shows_every_shard(collection):
    content, styles, out, args = collection
    for k in range(2):
        run_here(settings_of(content, styles, out), Shard(2, k))
    from nst_batch.batch.ledger import open_ledgers
    from nst_batch.report.build import write_report
    write_report(out)
    text = (out / "summary.csv").read_text()
    assert all(f"{c},{s},done" in text for c, s in names(content, styles))
    with open_ledgers(out) as led:  # each shard's stored curves, found by union id
        rows = led.rows()
        assert len(led.curves([r.id for r in rows])) == len(rows) == len(names(content, styles))
    pages = "".join(p.read_text() for p in (out / "styles").glob("*.html"))
    assert all(f'alt="{c}' in pages or c in pages for c, _ in names(content, styles))


def test_kill_and_resume_of_one_shard_redoes_only_its_inflight_pair(collection):
    content, styles, out, args = collection
    sizes = {k: sum(shard_of(*p, 4) == k for p in names(content, styles)) for k in range(4)}
    k = max(sizes, key=sizes.get)  # the most pairs: a pair done while others are still to come
    folder = Shard(4, k).folder(out)
    count_done_in(folder)
    slow = [*args, "--steps", "40", "--set", "stop_window=0", "--shard", f"{k}/4"]
    p = subprocess.Popen([sys.executable, "-m", "nst_batch.cli", "run", *slow], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # a pair done, the next ones in flight
            with Ledger(folder, readonly=True) as led:
                c = led.counts()
            if c["done"] >= 1 and c["running"] >= 1 and c["pending"] >= 1:
                break
            if p.poll() is not None:
                pytest.fail(f"the shard's run ended (rc {p.returncode}) before it could be killed mid-way")
            time.sleep(0.02)
        else:
            pytest.fail("the shard never had a pair done and one running")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with Ledger(folder, readonly=True) as led:
        killed = [(r.content, r.style) for r in led.rows() if r.state == "running"]
        done_before = {(r.content, r.style) for r in led.rows() if r.state == "done"}
    # In flight: the pair computing, and perhaps one computed whose image was still being written (and
    # recorded done only after that): the README says a kill loses the pairs in flight, at most two.
    assert 1 <= len(killed) <= 2
    r = cli("run", *slow)  # same host, dead PID: the claim is taken back at once, no lease to wait out
    assert r.returncode == 0, r.stdout + r.stderr
    with Ledger(folder, readonly=True) as led:
        rows = led.rows()
    assert all(r.state == "done" for r in rows)
    attempts = {(r.content, r.style): r.attempts for r in rows}
    assert [attempts.pop(pair) for pair in killed] == [2] * len(killed) and set(attempts.values()) == {1}
    log = done_log(folder)
    assert sorted(log) == sorted(attempts.keys() | set(killed))  # each once, the earlier ones not redone
    assert done_before <= set(log[:len(done_before)])
    assert not list(out.rglob(".*.tmp"))
    assert shards.found(out) == [Shard(4, k)]  # the other shards untouched


# -- layouts that do not mix -------------------------------------------------------------------------

def test_another_count_and_plain_vs_sharded_are_refused(collection, tmp_path):
    content, styles, out, args = collection
    run_here(settings_of(content, styles, out), Shard(4, 0))
    r = cli("run", *args, "--shard", "1/3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "split into 4 shards" in r.stderr and "asks for 3" in r.stderr and len(r.stderr.splitlines()) == 1
    with pytest.raises(ConfigError, match="--shard K/4"):
        run_here(settings_of(content, styles, out))  # a plain run on a sharded folder
    with pytest.raises(ConfigError, match="--shard K/4"):
        run_here(settings_of(content, styles, out), retry=True)
    assert shards.found(out) == [Shard(4, 0)] and not (out / "ledger.sqlite").exists()

    plain = tmp_path / "plain"
    run_here(settings_of(content, styles, plain))
    with pytest.raises(ConfigError, match="unsharded run"):
        run_here(settings_of(content, styles, plain), Shard(2, 0))
    assert not (plain / "shards").exists()


def test_two_counts_starting_together_both_stop(tmp_path):
    """The other count's folder exists but its ledger not yet (it is starting): this one backs off."""
    (tmp_path / "shards" / "0-of-8").mkdir(parents=True)
    with pytest.raises(ConfigError, match="0-of-8"):
        shards.claim_layout(tmp_path, Shard(4, 1))
    assert not Shard(4, 1).folder(tmp_path).exists()
    assert shards.claim_layout(tmp_path, Shard(8, 3)) == Shard(8, 3).folder(tmp_path)


def test_a_sharded_output_folder_is_never_read_as_input(collection, tmp_path):
    content, styles, out, args = collection
    inside = content / "styled"
    run_here(settings_of(content, styles, inside), Shard(2, 0))
    found = scan(content, "content", skip=tmp_path / "elsewhere")  # an earlier run's folder, not this one's
    assert all("styled" not in str(p) for p in found.files)
    assert any(s.path == "styled/" and s.reason == "output_folder" for s in found.skipped)


# -- adding photos -------------------------------------------------------------------------------------

def test_adding_photos_never_moves_a_pair_to_another_shard(collection):
    content, styles, out, args = collection
    run_here(settings_of(content, styles, out), Shard(3, 1))
    with Ledger(Shard(3, 1).folder(out), readonly=True) as led:
        before = {(r.content, r.style): r.attempts for r in led.rows()}
    for i in range(5, 12):
        make_image(content / f"p{i}.png", 40, 32, i)
    run_here(settings_of(content, styles, out), Shard(3, 1))
    with Ledger(Shard(3, 1).folder(out), readonly=True) as led:
        after = {(r.content, r.style): r.attempts for r in led.rows()}
    assert before.items() <= after.items()  # every earlier pair still here, not made again
    assert set(after) == {p for p in names(content, styles) if shard_of(*p, 3) == 1}
    assert len(after) > len(before)
    from nst_batch.config.manifest import Settings
    plan = make_plan(Settings(content=content, styles=styles, out=out))
    assert {(p.content, p.style) for p in plan if Shard(3, 1).owns(p.content, p.style)} == set(after)


# -- retry and the one-host rule --------------------------------------------------------------------------

def test_retry_of_a_sharded_folder(collection):
    content, styles, out, args = collection
    (content / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # fails as unreadable in 2 shards
    for k in range(2):
        assert run_here(settings_of(content, styles, out), Shard(2, k)).failed == 1
    with open_ledgers(out) as led:
        assert led.counts()["failed"] == 2
        failed_in = {s for s, part in led.parts if part.counts()["failed"]}
    assert failed_in == {Shard(2, 0), Shard(2, 1)}  # broken.jpg's two pairs fall in both shards
    make_image(content / "broken.jpg", 40, 32, 99)  # fixed

    # A shard with a live worker: a plain retry of the whole folder waits for the array.
    folder = Shard(2, 0).folder(out)
    with Ledger(folder) as led:
        led.register("gpu-node-7:123", {"anything": 1}, lease_s=600)
    r = cli("retry", str(out), "--quiet")
    assert r.returncode == 2 and "gpu-node-7:123" in r.stderr and "--shard" in r.stderr
    with Ledger(folder) as led:
        led.unregister("gpu-node-7:123")

    one = sorted(failed_in)[0]
    assert run_here(settings_of(content, styles, out), one, retry=True).made == 1  # retry --shard K/N
    with open_ledgers(out) as led:
        assert led.counts()["failed"] == len(failed_in) - 1
    r = cli("retry", str(out), "--quiet")  # the rest, shard after shard
    assert r.returncode == 0, r.stdout + r.stderr
    with open_ledgers(out) as led:
        assert led.counts() == {"pending": 0, "running": 0, "done": 12, "failed": 0}


def test_a_live_worker_of_another_host_keeps_its_shard(tmp_path):
    """One writer host per shard ledger: a registration that keeps beating is a live host (refused);
    one that stops (a lost node) is waited out, then the shard is taken."""
    from nst_batch.run.session import _one_host

    folder = Shard(2, 0).folder(tmp_path)
    notes = []
    display = Display(_null_console())
    display.note = notes.append
    with Ledger(folder) as led:
        led.register("lost-node:1", {}, lease_s=1.0)
        t0 = time.monotonic()
        _one_host(led, display, Shard(2, 0))  # its heartbeat stops: waited out
        assert time.monotonic() - t0 >= 0.5 and "waiting" in notes[0]

        led.register("busy-node:2", {}, lease_s=1.0)
        stop = threading.Event()

        def beat():
            with Ledger(folder) as other:
                while not stop.wait(0.2):
                    other.worker_heartbeat("busy-node:2")

        t = threading.Thread(target=beat)
        t.start()
        try:
            with pytest.raises(ConfigError, match="busy-node:2 is still running this shard"):
                _one_host(led, display, Shard(2, 0))
        finally:
            stop.set()
            t.join()


def test_a_shard_reads_only_the_inputs_of_its_own_pairs(collection, monkeypatch):
    """64 array tasks on one collection: each hashes the files its pairs use, not the whole collection."""
    from nst_batch.files import hashing
    from nst_batch.run import session

    content, styles, out, args = collection
    read = []
    real = hashing.file_hash

    class Counting(hashing.HashCache):
        def __init__(self, known=None):
            super().__init__(known, read=lambda p: read.append(p.name) or real(p))

    monkeypatch.setattr(session, "HashCache", Counting)
    shard = Shard(8, 3)
    mine = {p for p in names(content, styles) if shard.owns(*p)}
    assert mine and len(mine) < 10
    run_here(settings_of(content, styles, out), shard)
    assert set(read) == {c for c, _ in mine} | {s for _, s in mine}
    with Ledger(shard.folder(out), readonly=True) as led:
        assert {(r.content, r.style) for r in led.rows() if r.state == "done"} == mine


def test_ray_and_shard_together_are_refused(tmp_path):
    # A Ray cluster spreads the whole plan itself; a shard is one SLURM/Kubernetes task's share.
    make_image(tmp_path / "c" / "a.png", 32, 24, 1)
    make_image(tmp_path / "s" / "s.png", 32, 32, 2)
    r = subprocess.run([sys.executable, "-m", "nst_batch.cli", "run", "--content", str(tmp_path / "c"),
                        "--styles", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--ray", "local",
                        "--shard", "0/2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--ray and --shard do not go together" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_shard_with_other_settings_is_refused_while_another_shard_runs(collection):
    """The shards of one OUT share its networks and report: a shard started with another size while another
    shard's worker (another host's, live by its heartbeat) runs with the first size stops with exit 2 in one
    line naming the key and the shard; started with the same settings it runs beside it; and once that
    worker has gone, a shard may start with new settings."""
    from nst_batch.batch.plan import recipe_settings

    content, styles, out, args = collection
    same = recipe_settings(settings_of(content, styles, out, precision="fp32"))  # as a CPU run resolves them
    with Ledger(Shard(2, 0).folder(out)) as zero:
        zero.register("far-host:7", same, 600.0)  # shard 0 running on another host
    r = cli("run", *args, "--size", "40", "--shard", "1/2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "shard 0/2" in r.stderr and "far-host:7" in r.stderr and "size 40 here vs 32 there" in r.stderr
    with Ledger(Shard(2, 1).folder(out), readonly=True) as one:
        assert one.counts()["done"] == 0 and one.live_workers() == []
    mine = [p for p in names(content, styles) if Shard(2, 1).owns(*p)]
    assert run_here(settings_of(content, styles, out), Shard(2, 1)).made == len(mine) > 0  # the same: it runs
    with Ledger(Shard(2, 0).folder(out)) as zero:
        zero.unregister("far-host:7")  # shard 0 has finished: a shard may start with new settings
        zero.register(worker_id(), same | {"size": 40}, 600.0)
