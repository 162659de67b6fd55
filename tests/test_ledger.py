"""The run ledger on its own (no VGG, no CLI): what `sync` keeps, redoes and drops, atomic claims,
leases and dead workers, and what a bad ledger file turns into."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nst_batch.errors import ConfigError
from nst_batch.ledger import FILENAME, SCHEMA_VERSION, Ledger, worker_id
from nst_batch.manifest import Settings
from nst_batch.plan import make_plan, recipe_settings

from conftest import make_image

LEASE = 60.0
HOST = socket.gethostname()


def pair(content: str, style: str = "s.png", recipe: str = "r1") -> SimpleNamespace:
    return SimpleNamespace(content=content, style=style, content_path=Path("/in") / content,
                           style_path=Path("/st") / style, output=f"{style[:-4]}/{content[:-4]}.png", recipe=recipe)


def states(ledger: Ledger) -> dict[tuple[str, str], str]:
    return {(r.content, r.style): r.state for r in ledger.rows()}


def finish(ledger: Ledger, out: Path, worker: str = "w:1") -> None:
    """Claim every pending pair and mark it done, with its output file on disk, as a worker would."""
    while (r := ledger.claim(worker, LEASE)) is not None:
        (out / r.output).parent.mkdir(parents=True, exist_ok=True)
        (out / r.output).write_bytes(b"png")
        ledger.done(r.id, worker, 3, 1.0, 2.0, 0.1, 3.1)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: not even a zombie any more
    return p.pid


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def ledger(out: Path):
    led = Ledger(out)
    yield led
    led.close()


def test_wal_mode_and_schema_version(ledger, out):
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.get_meta("nothing", "dflt") == "dflt"
    db = sqlite3.connect(out / FILENAME)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()


def test_sync_inserts_new_pairs_as_pending(ledger, out):
    counts = ledger.sync([pair("a.png"), pair("b.png"), pair("a.png", "t.png")], out, LEASE)
    assert counts == {"new": 3, "redo": 0, "dropped": 0}
    assert set(states(ledger).values()) == {"pending"}
    assert ledger.counts() == {"pending": 3, "running": 0, "done": 0, "failed": 0}
    # Syncing the same plan again changes nothing.
    assert ledger.sync([pair("a.png"), pair("b.png"), pair("a.png", "t.png")], out, LEASE) == \
        {"new": 0, "redo": 0, "dropped": 0}


def test_done_pair_stays_done_while_output_and_recipe_are_unchanged(ledger, out):
    plan = [pair("a.png"), pair("b.png")]
    ledger.sync(plan, out, LEASE)
    finish(ledger, out)
    before = {r.id: r for r in ledger.rows()}
    assert ledger.sync(plan, out, LEASE) == {"new": 0, "redo": 0, "dropped": 0}
    after = {r.id: r for r in ledger.rows()}
    assert after == before  # not a column touched: attempts, finished_at, losses all kept


def test_deleted_output_makes_only_that_pair_pending(ledger, out):
    plan = [pair("a.png"), pair("b.png")]
    ledger.sync(plan, out, LEASE)
    finish(ledger, out)
    (out / "s/b.png").unlink()
    assert ledger.sync(plan, out, LEASE)["redo"] == 1
    assert states(ledger) == {("a.png", "s.png"): "done", ("b.png", "s.png"): "pending"}


def _files_plan(tmp_path: Path, **settings) -> tuple[Settings, list]:
    s = Settings(**{**dict(content=tmp_path / "c", styles=tmp_path / "s", out=tmp_path / "out", size=32, steps=3,
                           device="cpu"), **settings})
    return s, make_plan(s)


def test_changed_recipe_redoes_exactly_the_affected_pairs(tmp_path):
    """Real plans over real files: a changed setting redoes all pairs, changed bytes of one content file
    redo only that content's pairs, a changed style only that style's."""
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        make_image(tmp_path / "c" / name, 24, 20, i)
    for i, name in enumerate(("x.png", "y.png")):
        make_image(tmp_path / "s" / name, 20, 20, 10 + i)
    s, plan = _files_plan(tmp_path)
    led = Ledger(s.out)
    try:
        led.sync(plan, s.out, LEASE)
        finish(led, s.out)
        assert set(states(led).values()) == {"done"}

        # Settings that do not change pixels (device, lease, log_every) redo nothing.
        _, same = _files_plan(tmp_path, lease_s=5, log_every=1)
        assert led.sync(same, s.out, LEASE)["redo"] == 0

        make_image(tmp_path / "c" / "b.png", 24, 20, 99)  # same name, other bytes
        _, plan2 = _files_plan(tmp_path)
        assert led.sync(plan2, s.out, LEASE)["redo"] == 2
        assert {k for k, v in states(led).items() if v == "pending"} == {("b.png", "x.png"), ("b.png", "y.png")}
        finish(led, s.out)

        make_image(tmp_path / "s" / "y.png", 20, 20, 98)
        _, plan3 = _files_plan(tmp_path)
        assert led.sync(plan3, s.out, LEASE)["redo"] == 3
        assert {k for k, v in states(led).items() if v == "pending"} == {(c, "y.png") for c in ("a.png", "b.png", "c.png")}
        finish(led, s.out)

        _, plan4 = _files_plan(tmp_path, steps=4)
        assert led.sync(plan4, s.out, LEASE)["redo"] == 6
        assert set(states(led).values()) == {"pending"}
        # The new recipe is what the ledger now holds: syncing again redoes nothing more.
        assert led.sync(plan4, s.out, LEASE)["redo"] == 0
    finally:
        led.close()


def test_failed_stays_failed_unless_its_recipe_changed(ledger, out):
    plan = [pair("a.png"), pair("b.png")]
    ledger.sync(plan, out, LEASE)
    for _ in range(2):
        r = ledger.claim("w:1", LEASE)
        ledger.fail(r.id, "w:1", "unreadable", f"{r.content}: not an image")
    assert ledger.sync(plan, out, LEASE)["redo"] == 0
    assert set(states(ledger).values()) == {"failed"}
    assert {r.error_kind for r in ledger.rows()} == {"unreadable"}
    ledger.sync([pair("a.png", recipe="r2"), pair("b.png")], out, LEASE)
    assert states(ledger) == {("a.png", "s.png"): "pending", ("b.png", "s.png"): "failed"}


def test_requeue_failed_by_kind(ledger, out):
    ledger.sync([pair("a.png"), pair("b.png"), pair("c.png")], out, LEASE)
    for kind in ("oom", "unreadable", "oom"):
        r = ledger.claim("w:1", LEASE)
        ledger.fail(r.id, "w:1", kind, "x")
    assert ledger.requeue_failed(k for k in ["oom"]) == [1, 3]  # any iterable, a generator too
    assert [r.state for r in ledger.rows()] == ["pending", "failed", "pending"]
    assert ledger.requeue_failed() == [2]


def test_pairs_gone_from_the_plan_are_dropped_unless_done(ledger, out):
    ledger.sync([pair("done.png"), pair("pending.png"), pair("failed.png"), pair("stale.png"),
                 pair("keep.png")], out, LEASE)
    by_name = {r.content: r for r in ledger.rows()}
    for name, what in (("done.png", "done"), ("failed.png", "fail"), ("stale.png", None)):
        r = ledger.claim(f"{HOST}:{dead_pid()}", LEASE, only={by_name[name].id})
        if what == "done":
            (out / r.output).parent.mkdir(parents=True, exist_ok=True)
            (out / r.output).write_bytes(b"png")
            ledger.done(r.id, r.worker, 3, 1, 1, 1, 3)
        elif what == "fail":
            ledger.fail(r.id, r.worker, "unreadable", "x")
    # stale.png: claimed by a worker that died, never finished.
    counts = ledger.sync([pair("keep.png")], out, LEASE)
    assert states(ledger) == {("done.png", "s.png"): "done", ("keep.png", "s.png"): "pending"}
    assert counts["dropped"] == 3


def test_a_live_claim_is_left_alone_by_sync_and_claim(ledger, out):
    ledger.sync([pair("a.png")], out, LEASE)
    r = ledger.claim(worker_id(), LEASE)  # this very process: alive
    assert r.state == "running" and r.attempts == 1
    ledger.sync([pair("a.png", recipe="r2")], out, LEASE)  # even a changed recipe waits for the live claim
    assert ledger.get(r.id).state == "running" and ledger.get(r.id).worker == worker_id()
    other = Ledger(out)
    try:
        assert other.claim("otherhost:1", LEASE) is None
    finally:
        other.close()


def test_expired_lease_is_reclaimed(ledger, out):
    ledger.sync([pair("a.png")], out, LEASE)
    r = ledger.claim("elsewhere:123", LEASE)  # another machine: its pid means nothing here
    assert ledger.claim("w:2", LEASE) is None
    ledger.heartbeat(r.id, "elsewhere:123")
    assert ledger.claim("w:2", LEASE) is None
    ledger.db.execute("UPDATE pairs SET heartbeat=? WHERE id=?", (time.time() - LEASE - 1, r.id))
    again = ledger.claim("w:2", LEASE)
    assert again is not None and again.id == r.id and again.worker == "w:2" and again.attempts == 2
    # The old worker's late news does not overwrite the new claim.
    ledger.heartbeat(r.id, "elsewhere:123")
    ledger.done(r.id, "elsewhere:123", 3, 1, 1, 1, 3)
    assert ledger.get(r.id).state == "running" and ledger.get(r.id).worker == "w:2"


def test_expired_lease_makes_sync_put_the_pair_back_to_pending(ledger, out):
    ledger.sync([pair("a.png")], out, LEASE)
    r = ledger.claim("elsewhere:123", LEASE)
    ledger.sync([pair("a.png")], out, LEASE)
    assert ledger.get(r.id).state == "running"
    ledger.db.execute("UPDATE pairs SET heartbeat=? WHERE id=?", (time.time() - LEASE - 1, r.id))
    ledger.sync([pair("a.png")], out, LEASE)
    assert ledger.get(r.id).state == "pending" and ledger.get(r.id).worker is None


def test_claim_of_a_dead_local_process_is_reclaimed_at_once(ledger, out):
    ledger.sync([pair("a.png"), pair("b.png")], out, LEASE)
    dead = f"{HOST}:{dead_pid()}"
    live = f"{HOST}:{os.getppid()}"  # our parent: alive, and not us
    a = ledger.claim(live, 3600)
    b = ledger.claim(dead, 3600)
    assert (a.content, b.content) == ("a.png", "b.png")
    got = ledger.claim("w:2", 3600)  # heartbeat fresh, lease an hour: only the dead pid frees it
    assert got is not None and got.id == b.id
    assert ledger.claim("w:3", 3600) is None  # the live one is not taken


def test_release_puts_a_claim_back_and_never_undoes_done(ledger, out):
    ledger.sync([pair("a.png"), pair("b.png")], out, LEASE)
    a = ledger.claim("w:1", LEASE)
    ledger.release(a.id, "w:1")
    assert ledger.get(a.id).state == "pending" and ledger.get(a.id).worker is None
    a = ledger.claim("w:1", LEASE)
    assert a.attempts == 2  # an interrupted attempt stays counted
    (out / a.output).parent.mkdir(parents=True, exist_ok=True)
    (out / a.output).write_bytes(b"png")
    ledger.done(a.id, "w:1", 3, 1, 1, 1, 3)
    ledger.release(a.id, "w:1")  # e.g. Ctrl-C landing right after the pair was recorded
    assert ledger.get(a.id).state == "done"


# -- workers with other settings (issue 8) ------------------------------------------------------------


def test_a_worker_never_claims_a_pair_stored_under_another_recipe(ledger, out):
    """Worker A (recipe r1) made a pair; a worker B with other settings synced it back to pending under
    its recipe r2. A must not claim it: it would make it A's way and record it done under r2."""
    ledger.sync([pair("a.png"), pair("b.png")], out, LEASE)
    finish(ledger, out, "A:1")
    ledger.sync([pair("a.png", recipe="r2"), pair("b.png", recipe="r2")], out, LEASE)  # B's sync
    assert set(states(ledger).values()) == {"pending"}
    mine = {("a.png", "s.png"): "r1", ("b.png", "s.png"): "r1"}
    assert ledger.claim("A:1", LEASE, recipes=mine) is None
    assert ledger.peek(recipes=mine) is None  # nothing to prefetch either
    theirs = {k: "r2" for k in mine}
    got = ledger.claim("B:2", LEASE, recipes=theirs)
    assert got is not None and got.recipe == "r2"


def test_done_is_refused_once_the_claim_was_reset_under_another_recipe(ledger, out):
    """A's lease ran out (a stopped process) while it made a pair; B reset it under its recipe, made it
    and recorded it done. A's late done must not count, and since A's file may now have replaced B's,
    the pair goes back to pending rather than stay done under a recipe its file may not have."""
    ledger.sync([pair("a.png")], out, LEASE)
    a = ledger.claim("A:1", LEASE, recipes={("a.png", "s.png"): "r1"})
    ledger.sync([pair("a.png", recipe="r2")], out, 0.0)  # lease 0: A's claim counts as lapsed
    b = ledger.claim("B:2", LEASE, recipes={("a.png", "s.png"): "r2"})
    assert b.id == a.id
    (out / b.output).parent.mkdir(parents=True, exist_ok=True)
    (out / b.output).write_bytes(b"png")
    assert ledger.done(b.id, "B:2", 3, 1, 1, 1, 3, recipe="r2") is True
    assert ledger.done(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r1") is False
    row = ledger.get(a.id)
    assert (row.state, row.recipe, row.worker) == ("pending", "r2", None)


def test_done_needs_the_recipe_the_pair_was_claimed_under(ledger, out):
    ledger.sync([pair("a.png")], out, LEASE)
    a = ledger.claim("A:1", LEASE)
    assert ledger.done(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r2") is False  # made for another recipe
    assert ledger.get(a.id).state == "running"
    assert ledger.done(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r1") is True
    assert ledger.get(a.id).state == "done"


def _settings(**kw) -> dict:
    return recipe_settings(Settings(**{**dict(size=32, steps=3, device="cpu", precision="fp32"), **kw}))


def test_a_worker_with_other_settings_is_refused_while_another_is_live(ledger, out):
    live = f"{HOST}:{os.getppid()}"  # our parent: a live process, and not us
    ledger.register(live, _settings(), LEASE)
    with pytest.raises(ConfigError) as e:
        ledger.register(worker_id(), _settings(size=48, precision="bf16"), LEASE)
    msg = str(e.value)
    assert "\n" not in msg and live in msg and str(out) in msg
    assert "precision bf16 here vs fp32 there, size 48 here vs 32 there" in msg
    # Settings that do not change pixels do not count: the device (same precision), the lease, PNG quality.
    ledger.register(worker_id(), _settings(device="auto", lease_s=5, log_every=1, quality=50), LEASE)
    # A worker that has gone (unregistered, dead, or silent past its lease) holds nothing.
    ledger.unregister(live)
    ledger.register(worker_id(), _settings(size=48), LEASE)
    ledger.unregister(worker_id())
    for gone, beat in ((f"{HOST}:{dead_pid()}", time.time()), ("elsewhere:1", time.time() - LEASE - 1)):
        ledger.register(gone, _settings(), LEASE)
        ledger.db.execute("UPDATE workers SET heartbeat=? WHERE worker=?", (beat, gone))
        ledger.register(worker_id(), _settings(size=48), LEASE)
        ledger.unregister(worker_id())
    assert ledger.db.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 0  # the gone ones forgotten


def test_worker_heartbeat_keeps_a_registration_live(ledger, out):
    other = "elsewhere:1"
    ledger.register(other, _settings(), LEASE)
    ledger.db.execute("UPDATE workers SET heartbeat=?", (time.time() - LEASE + 0.5,))
    ledger.worker_heartbeat(other)
    time.sleep(0.6)  # the old beat would have expired by now
    with pytest.raises(ConfigError, match="size 48 here vs 32 there"):
        ledger.register(worker_id(), _settings(size=48), LEASE)


def test_a_schema_1_ledger_opens_and_is_migrated(out):
    """Schema 1 is schema 2 without the workers table."""
    led = Ledger(out)
    led.sync([pair("a.png")], out, LEASE)
    finish(led, out)
    before = led.rows()
    led.close()
    db = sqlite3.connect(out / FILENAME)
    db.execute("DROP TABLE workers")
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.commit()
    db.close()
    ro = Ledger(out, readonly=True)  # status and report read it as it is
    assert ro.rows() == before
    ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 2
        assert led.rows() == before
        led.register(worker_id(), _settings(), LEASE)
    finally:
        led.close()


def test_claim_is_atomic_across_threads(out):
    """Two threads, each with its own connection, claim until nothing is left: no pair twice."""
    setup = Ledger(out)
    setup.sync([pair(f"{i:02d}.png") for i in range(50)], out, LEASE)
    setup.close()
    got: dict[str, list[int]] = {}
    go = threading.Barrier(2)

    def worker(name: str) -> None:
        led = Ledger(out)
        mine = got.setdefault(name, [])
        go.wait()
        while (r := led.claim(name, LEASE)) is not None:
            mine.append(r.id)
        led.close()

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = got["t0"], got["t1"]
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(1, 51))


_CLAIMER = r"""
import sys, time
from pathlib import Path
from nst_batch.ledger import Ledger, worker_id
out, go = Path(sys.argv[1]), Path(sys.argv[2])
led = Ledger(out)
while not go.exists():
    time.sleep(0.005)
ids = []
while (r := led.claim(worker_id(), 600)) is not None:
    ids.append(r.id)
    led.done(r.id, worker_id(), 3, 1, 1, 1, 3)  # done: a claim of ours cannot be taken even once we exit
print(" ".join(map(str, ids)))
"""


def test_claim_is_atomic_across_processes(out, tmp_path):
    setup = Ledger(out)
    setup.sync([pair(f"{i:02d}.png") for i in range(50)], out, LEASE)
    setup.close()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(out), str(go)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    a, b = ([int(x) for x in o.split()] for o in outs)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(1, 51))
    led = Ledger(out)
    try:
        assert {r.attempts for r in led.rows()} == {1}
        assert led.counts()["done"] == 50
    finally:
        led.close()


def test_newer_schema_is_refused_with_a_clear_message(out):
    Ledger(out).close()
    db = sqlite3.connect(out / FILENAME)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"newer nst-batch.*upgrade"):
        Ledger(out)
    with pytest.raises(ConfigError, match="newer"):
        Ledger(out, create=False)


@pytest.mark.parametrize("garbage", [os.urandom(8192), b"this is not a database\n" * 300,
                                     b"SQLite format 3\x00" + os.urandom(4080)],
                         ids=["random", "text", "bad-pages"])
def test_corrupt_ledger_is_a_config_error(out, garbage):
    out.mkdir()
    (out / FILENAME).write_bytes(garbage)
    for create in (True, False):
        with pytest.raises(ConfigError, match="not a usable ledger"):
            Ledger(out, create=create)
    assert (out / FILENAME).read_bytes() == garbage  # left as it was, for the user to look at


def test_missing_ledger_without_create(out):
    with pytest.raises(ConfigError, match="no run ledger"):
        Ledger(out, create=False)
    assert not out.exists()
