"""The run ledger on its own (no VGG, no CLI): what `sync` keeps, redoes and drops, atomic claims,
leases and dead workers, and what a bad ledger file turns into."""

from __future__ import annotations

import json
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
from nst_batch.batch.ledger import FILENAME, SCHEMA_VERSION, Finished, Ledger, LedgerSet, worker_id
from nst_batch.config.manifest import Settings
from nst_batch.batch.plan import make_plan, recipe_settings

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
        ledger.done(Finished(r.id, worker, 3, 1.0, 2.0, 0.1, 3.1))


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
            ledger.done(Finished(r.id, r.worker, 3, 1, 1, 1, 3))
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
    ledger.done(Finished(r.id, "elsewhere:123", 3, 1, 1, 1, 3))
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
    ledger.done(Finished(a.id, "w:1", 3, 1, 1, 1, 3))
    ledger.release(a.id, "w:1")  # e.g. Ctrl-C landing right after the pair was recorded
    assert ledger.get(a.id).state == "done"


# -- workers with other settings ---------------------------------------------------------------------


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
    assert ledger.done(Finished(b.id, "B:2", 3, 1, 1, 1, 3, recipe="r2")) is True
    assert ledger.done(Finished(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r1")) is False
    row = ledger.get(a.id)
    assert (row.state, row.recipe, row.worker) == ("pending", "r2", None)


def test_done_needs_the_recipe_the_pair_was_claimed_under(ledger, out):
    ledger.sync([pair("a.png")], out, LEASE)
    a = ledger.claim("A:1", LEASE)
    assert ledger.done(Finished(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r2")) is False  # made for another recipe
    assert ledger.get(a.id).state == "running"
    assert ledger.done(Finished(a.id, "A:1", 3, 1, 1, 1, 3, recipe="r1")) is True
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


def test_a_shard_is_refused_while_another_shard_runs_with_other_settings(out):
    """The shards of one OUT share its networks: a shard's worker is refused, naming the keys and the
    shard, while a worker on another shard's ledger (another host's: judged by heartbeat and lease) has
    other settings; equal settings go on together, and a shard whose workers have gone holds nothing."""
    from nst_batch.batch.shards import Shard

    zero, one = (Ledger(Shard(3, k).folder(out)) for k in (0, 1))
    Ledger(Shard(3, 2).folder(out)).close()  # a third shard, nothing running on it
    try:
        zero.register("far-host:7", _settings(), LEASE)
        with pytest.raises(ConfigError) as e:
            one.register(worker_id(), _settings(size=48), LEASE)
        msg = str(e.value)
        assert "\n" not in msg and "shard 0/3" in msg and "far-host:7" in msg and "size 48 here vs 32 there" in msg
        assert one.live_workers() == []  # refused: its registration taken back
        one.register(worker_id(), _settings(), LEASE)  # the same settings: both run
        assert [w for w, _, _ in one.live_workers()] == [worker_id()]
        one.unregister(worker_id())
        zero.db.execute("UPDATE workers SET heartbeat=?", (time.time() - LEASE - 1,))  # that host went quiet
        one.register(worker_id(), _settings(size=48), LEASE)
        # Now the first shard's worker with its old settings is the one refused, by this shard's.
        zero.db.execute("UPDATE workers SET heartbeat=?", (time.time(),))
        with pytest.raises(ConfigError, match=r"shard 1/3 .*size 32 here vs 48 there"):
            zero.register("far-host:8", _settings(), LEASE)
    finally:
        zero.close()
        one.close()


def as_schema(out, version: int, *undo: str) -> None:
    """Rewrite OUT's ledger as an older nst-batch left it: `undo` removes what later schemas added."""
    db = sqlite3.connect(out / FILENAME)
    for stmt in undo:
        db.execute(stmt)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    db.commit()
    db.close()


def test_a_schema_1_ledger_opens_and_is_migrated(out):
    """Schema 1 is schema 2 without the workers table."""
    led = Ledger(out)
    led.sync([pair("a.png")], out, LEASE)
    finish(led, out)
    before = led.rows()
    led.close()
    as_schema(out, 1, "ALTER TABLE pairs DROP COLUMN model", "DROP TABLE models", "ALTER TABLE pairs DROP COLUMN method", "DROP TABLE workers", "ALTER TABLE pairs DROP COLUMN curve")
    ro = Ledger(out, readonly=True)  # status and report read it as it is
    assert ro.rows() == before
    ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 7
        assert led.rows() == before
        assert {"workers", "files", "pairs_state_style"} <= _names(led)
        led.register(worker_id(), _settings(), LEASE)
    finally:
        led.close()


def _names(led: Ledger) -> set[str]:
    return {r[0] for r in led.db.execute("SELECT name FROM sqlite_master")}


def test_a_schema_2_ledger_is_read_as_it_is_and_migrated_for_writers(out):
    """Schema 2 is schema 3 without the files table and the (state, style) index. `status` and
    `report` read it without changing it; a worker migrates it and keeps every pair."""
    from nst_batch.report.status import load_summary

    led = Ledger(out)
    led.sync([pair("a.png"), pair("b.png"), pair("c.png", "t.png")], out, LEASE)
    r = led.claim("w:1", LEASE)
    led.fail(r.id, "w:1", "unreadable", "x")
    led.store_hashes({"/in/a.png": (3, 4, "h")})
    before = led.rows()
    led.close()
    as_schema(out, 2, "ALTER TABLE pairs DROP COLUMN model", "DROP TABLE models", "ALTER TABLE pairs DROP COLUMN method", "DROP TABLE files", "DROP INDEX pairs_state_style", "ALTER TABLE pairs DROP COLUMN curve")
    summary = load_summary(out)
    assert summary.counts == {"pending": 2, "running": 0, "done": 0, "failed": 1} and summary.total == 3
    assert Ledger.stored_hashes(out) == {}  # no cache yet: every file is read once, as before
    ro = Ledger(out, readonly=True)
    assert ro.get_meta("schema_version") == 2 and "files" not in _names(ro)  # untouched by readers
    ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION
        assert led.rows() == before
        led.store_hashes({"/in/a.png": (3, 4, "h")})
        assert Ledger.stored_hashes(out) == {"/in/a.png": (3, 4, "h")}
        assert led.claim("w:1", LEASE, style="t.png").content == "c.png"
    finally:
        led.close()


def test_a_schema_3_ledger_has_no_curves_for_readers_and_gets_the_column_for_writers(out):
    """Schema 3 is schema 4 without pairs.curve: readers see no curves (the report falls back to
    losses.csv); a worker adds the column, and a pair's curve is stored when it is done and cleared
    when it is claimed again."""
    led = Ledger(out)
    led.sync([pair("a.png"), pair("b.png")], out, LEASE)
    finish(led, out)
    before = led.rows()
    led.close()
    as_schema(out, 3, "ALTER TABLE pairs DROP COLUMN model", "DROP TABLE models", "ALTER TABLE pairs DROP COLUMN method", "ALTER TABLE pairs DROP COLUMN curve")
    ro = Ledger(out, readonly=True)
    try:
        assert ro.rows() == before and ro.get(before[0].id) == before[0]
        assert ro.curves(r.id for r in before) == {}
        assert ro.get_meta("schema_version") == 3  # untouched by readers
    finally:
        ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 7
        assert led.rows() == before and led.curves(r.id for r in before) == {}
        led.sync([pair("a.png"), pair("b.png"), pair("c.png")], out, LEASE)
        r = led.claim("w:1", LEASE)
        assert led.done(Finished(r.id, "w:1", 10, 1.0, 2.0, 0.1, 3.1, curve="[[10,32,1,2,3.1]]"))
        assert led.curves([r.id, 999]) == {r.id: "[[10,32,1,2,3.1]]"}
        assert led.get(r.id).state == "done"  # a Row whatever columns the table has
        led.db.execute("UPDATE pairs SET state='pending' WHERE id=?", (r.id,))
        led.claim("w:1", LEASE, only={r.id})
        assert led.curves([r.id]) == {}  # a new attempt: the old curve is not its curve
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
from nst_batch.batch.ledger import Finished, Ledger, worker_id
out, go = Path(sys.argv[1]), Path(sys.argv[2])
led = Ledger(out)
while not go.exists():
    time.sleep(0.005)
ids = []
while (r := led.claim(worker_id(), 600)) is not None:
    ids.append(r.id)
    led.done(Finished(r.id, worker_id(), 3, 1, 1, 1, 3))  # done: a claim of ours cannot be taken even once we exit
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


# -- whole collections: claims by index, sync that writes only what changed ----------------


def _ledger_of(out: Path, n: int, styles: int = 4) -> Ledger:
    """n pairs over `styles` styles, style-major as plans are, with some done, failed and running."""
    led = Ledger(out)
    per = n // styles
    led.sync([pair(f"{i:05d}.png", f"s{k}.png") for k in range(styles) for i in range(per)], out, LEASE)
    with led._tx() as db:  # the first half finished, a few failed, one held by a live worker
        db.execute("UPDATE pairs SET state='done', seconds=1.0 WHERE id <= ?", (n // 2,))
        db.execute("UPDATE pairs SET state='failed' WHERE id % 97 = 0")
        db.execute("UPDATE pairs SET state='running', worker=?, heartbeat=? WHERE id = ?",
                   (f"{HOST}:{os.getppid()}", time.time(), n // 2 + 1))
    return led


def _claim_calls(led: Ledger, n: int) -> list:
    """What a worker asks of the ledger: claims plain, of one style, of a retry's ids, of its recipes;
    peeks. Each is undone again, so every call sees the same ledger."""
    first = n // 2 + 2
    only = set(range(first, n, 7))
    mine = {(r["content"], r["style"]): r["recipe"] for r in led.db.execute("SELECT content, style, recipe FROM pairs")}
    return [lambda: led.claim("w:1", LEASE), lambda: led.claim("w:1", LEASE, style="s3.png"),
            lambda: led.claim("w:1", LEASE, only=only), lambda: led.claim("w:1", LEASE, recipes=mine),
            lambda: led.claim("w:1", LEASE, only=only, style="s2.png", recipes=mine),
            lambda: led.peek(), lambda: led.peek(only, mine)]


def _undo(led: Ledger, row) -> None:
    if row is not None and row.state == "running":
        led.db.execute("UPDATE pairs SET state='pending', worker=NULL, heartbeat=NULL WHERE id=?", (row.id,))


def test_claim_and_peek_queries_search_an_index(out):
    """A claim reads a few rows through an index (SEARCH), never the whole table (SCAN) nor sorts
    it, whatever the ledger holds: the queries each call really ran are asked for their plan."""
    n = 4000
    led = _ledger_of(out, n)
    try:
        calls, ran = _claim_calls(led, n), []
        led.db.set_trace_callback(ran.append)  # the SQL as executed, values bound
        for call in calls:
            _undo(led, call())
        led.db.set_trace_callback(None)
        selects = [q for q in ran if q.lstrip().upper().startswith("SELECT") and "pairs" in q]
        assert len(selects) >= 10
        seen_index = set()
        for q in selects:
            plan = [r[3] for r in led.db.execute("EXPLAIN QUERY PLAN " + q)]
            # (A DISTINCT over the running rows, a few, may use a temporary tree; no sort of the table.)
            assert not any(d.startswith("SCAN") or "B-TREE FOR ORDER BY" in d for d in plan), (q, plan)
            seen_index |= {i for i in ("pairs_state ", "pairs_state_style ") if any(i in d + " " for d in plan)}
        assert seen_index == {"pairs_state ", "pairs_state_style "}
    finally:
        led.close()


def _vm_steps(led: Ledger, call, undo: bool = True) -> int:
    """SQLite virtual-machine instructions a call runs: work done, counted, not timed. With `undo`,
    a pair it claimed is put back."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    led.db.set_progress_handler(tick, 1)
    try:
        row = call()
    finally:
        led.db.set_progress_handler(None, 1)
    if undo:
        _undo(led, row)
    return steps[0]


def test_a_claim_does_the_same_work_in_a_ledger_ten_times_bigger(tmp_path):
    small, big = _ledger_of(tmp_path / "small", 1000), _ledger_of(tmp_path / "big", 10000)
    try:
        for s_call, b_call in zip(_claim_calls(small, 1000), _claim_calls(big, 10000)):
            s_call(), b_call()  # the first call of `only` fills its table once (as a run does)
        for s_call, b_call in zip(_claim_calls(small, 1000), _claim_calls(big, 10000)):
            s, b = _vm_steps(small, s_call), _vm_steps(big, b_call)
            assert b < 1.5 * s + 200, (s, b)  # linear work would be ~10 times as much
    finally:
        small.close()
        big.close()


def test_only_claims_just_the_retry_ids_in_order(ledger, out):
    ledger.sync([pair(f"{i:04d}.png") for i in range(600)], out, LEASE)
    only = set(range(5, 600, 9))
    got = []
    while (r := ledger.claim("w:1", LEASE, only=only)) is not None:
        got.append(r.id)
    assert got == sorted(only)
    assert ledger.counts() == {"pending": 600 - len(only), "running": len(only), "done": 0, "failed": 0}
    # Another set (a new retry) is another table; a stale claim inside it is taken again, one outside not.
    ledger.db.execute("UPDATE pairs SET heartbeat=? WHERE id IN (5, 14)", (time.time() - LEASE - 1,))
    assert ledger.claim("w:2", LEASE, only={14, 1}).id == 1
    assert ledger.claim("w:2", LEASE, only={14, 1}).id == 14
    assert ledger.claim("w:2", LEASE, only={14, 1}) is None
    assert ledger.peek(only={2, 3}).id == 2 and ledger.peek(only=set()) is None


def test_style_claims_fill_a_batch_of_that_style_only(ledger, out):
    ledger.sync([pair(f"{i}.png", s) for s in ("s.png", "t.png") for i in range(30)], out, LEASE)
    first = ledger.claim("w:1", LEASE)
    assert first.style == "s.png"
    batch = [ledger.claim("w:1", LEASE, style="t.png") for _ in range(31)]
    assert [r.content for r in batch[:30]] == [f"{i}.png" for i in range(30)] and batch[30] is None
    assert ledger.claim("w:1", LEASE).content == "1.png"  # the rest of s.png, in order


def test_recipes_step_over_many_pairs_stored_under_another_recipe(ledger, out):
    """More pairs of another recipe than one query reads (_STEP) come first: the claim pages past them."""
    plan = [pair(f"{i:03d}.png", recipe="r2" if i < 70 else "r1") for i in range(80)]
    ledger.sync(plan, out, LEASE)
    mine = {(p.content, p.style): "r1" for p in plan}
    assert ledger.peek(recipes=mine).content == "070.png"
    got = [ledger.claim("A:1", LEASE, recipes=mine) for _ in range(11)]
    assert [r.content for r in got[:10]] == [f"{i:03d}.png" for i in range(70, 80)] and got[10] is None
    assert ledger.counts()["pending"] == 70


def test_a_stale_claim_goes_before_later_pending_pairs(ledger, out):
    ledger.sync([pair("a.png"), pair("b.png"), pair("c.png"), pair("d.png", "t.png")], out, LEASE)
    dead = f"{HOST}:{dead_pid()}"
    ledger.claim(f"{HOST}:{os.getppid()}", LEASE)  # a: held by a live process
    b = ledger.claim(dead, LEASE)
    assert [ledger.claim("w:2", LEASE).content for _ in range(2)] == ["b.png", "c.png"]
    assert ledger.get(b.id).attempts == 2
    # With a style, a stale claim of another style is not taken.
    ledger.db.execute("UPDATE pairs SET worker=? WHERE id=?", (dead, b.id))
    assert ledger.claim("w:3", LEASE, style="t.png").content == "d.png"
    assert ledger.claim("w:3", LEASE, style="t.png") is None


def test_sync_of_an_unchanged_plan_writes_nothing(out):
    led = _ledger_of(out, 400)
    try:
        plan = [pair(f"{i:05d}.png", f"s{k}.png") for k in range(4) for i in range(100)]
        for r in led.rows():  # every done pair has its file
            if r.state == "done":
                (out / r.output).parent.mkdir(parents=True, exist_ok=True)
                (out / r.output).write_bytes(b"png")
        before = led.db.total_changes
        assert led.sync(plan, out, LEASE) == {"new": 0, "redo": 0, "dropped": 0}
        assert led.db.total_changes == before
        (out / "s0/00003.png").unlink()
        assert led.sync(plan, out, LEASE) == {"new": 0, "redo": 1, "dropped": 0}
        assert led.db.total_changes == before + 1
    finally:
        led.close()


def test_sync_takes_the_new_paths_of_moved_input_folders(ledger, out):
    """The same files (same recipes) under another folder: unfinished pairs must be made from where
    the files are now, not from where they were."""
    ledger.sync([pair("a.png"), pair("b.png")], out, LEASE)
    moved = [SimpleNamespace(**{**vars(p), "content_path": Path("/new") / p.content}) for p in
             (pair("a.png"), pair("b.png"))]
    assert ledger.sync(moved, out, LEASE) == {"new": 0, "redo": 0, "dropped": 0}
    assert {r.content_path for r in ledger.rows()} == {"/new/a.png", "/new/b.png"}
    assert ledger.claim("w:1", LEASE).content_path == "/new/a.png"


def test_summary_from_sql_equals_the_summary_of_all_rows(ledger, out):
    from nst_batch.report.status import load_summary, summarize

    ledger.sync([pair(f"{i}.png", s) for s in ("s.png", "t.png") for i in range(12)], out, LEASE)
    t0 = 1_700_000_000.0
    for i in range(9):
        r = ledger.claim("w:1", LEASE)
        if i % 4 == 3:
            ledger.fail(r.id, "w:1", "oom" if i < 5 else "unreadable", f"{r.content} too big")
        else:  # ties in seconds and loss: the lower id first, as a stable sort of the rows has it
            ledger.done(Finished(r.id, "w:1", 3, 1.0, 2.0, 0.1, [3.5, 2.0, 3.5][i % 3], finished_at=t0 + 10 * i))
            ledger.db.execute("UPDATE pairs SET started_at=?, seconds=? WHERE id=?",
                              (t0 + 10 * i - [7.0, 3.0, 7.0][i % 3], [7.0, 3.0, 7.0][i % 3], r.id))
    ledger.claim("w:1", LEASE)  # one running
    ledger.close()
    ro = Ledger(out, readonly=True)
    try:
        assert load_summary(out) == summarize(ro.rows())
    finally:
        ro.close()
    s = load_summary(out)
    assert s.counts == {"pending": 14, "running": 1, "done": 7, "failed": 2} and s.total == 24
    assert [x["content"] for x in s.slowest][:2] == ["0.png", "2.png"] and len(s.failures) == 2


def test_a_long_retry_does_not_reread_the_ids_it_took(ledger, out):
    """Claims of a retry start past the ids already taken, yet a pair of the set that is pending again
    (released by another worker, say) is still found once nothing else is left."""
    ledger.sync([pair(f"{i:04d}.png") for i in range(400)], out, LEASE)
    only = set(range(1, 401, 2))
    first = ledger.claim("w:1", LEASE, only=only)
    steps, taken = [], []
    for _ in range(150):  # each made and recorded, as a worker does
        steps.append(_vm_steps(ledger, lambda: taken.append(ledger.claim("w:1", LEASE, only=only)), undo=False))
        ledger.done(Finished(taken[-1].id, "w:1", 3, 1, 1, 1, 3))
    assert max(steps[-10:]) < 2 * max(steps[:10]) + 100  # not growing with the ids taken
    ledger.db.execute("UPDATE pairs SET state='pending', worker=NULL WHERE id=?", (first.id,))
    got = []
    while (r := ledger.claim("w:1", LEASE, only=only)) is not None:
        got.append(r.id)
    assert got[-1] == first.id and len(got) == 200 - 151 + 1 and set(got) <= only


def test_a_schema_4_ledger_reads_as_optimised_and_gets_methods_and_models_for_writers(out):
    """Schema 4 is schema 5 without pairs.method and the models table: readers count its done
    pairs as optimised and see no models; a worker adds both, and a pair records what made it."""
    led = Ledger(out)
    led.sync([pair("a.png"), pair("b.png")], out, LEASE)
    finish(led, out)
    led.close()
    as_schema(out, 4, "ALTER TABLE pairs DROP COLUMN model", "DROP TABLE models", "ALTER TABLE pairs DROP COLUMN method")
    ro = Ledger(out, readonly=True)
    try:
        assert ro.method_counts() == {"optimize": 2} and ro.models() == {}
        assert ro.get_meta("schema_version") == 4
    finally:
        ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 7
        led.sync([pair("a.png"), pair("b.png"), pair("c.png")], out, LEASE)
        r = led.claim("w:1", LEASE)
        assert led.done(Finished(r.id, "w:1", 10, 1.0, 2.0, 0.1, 3.1, method="network"))
        assert led.method_counts() == {"optimize": 2, "network": 1}
        assert led.methods()[(r.content, r.style)] == "network"
        led.set_model("s.png", "m1", 5, 10, curve="[[5,32,1,2,3]]")
        led.set_model("s.png", "m1", 10, 10)  # a later checkpoint keeps the curve stored before
        assert led.models()["s.png"]["step"] == 10 and led.models()["s.png"]["curve"] == "[[5,32,1,2,3]]"
    finally:
        led.close()


# -- the schema declared once, the states as an enum, the shards read as one --------------------------


def test_row_and_the_table_have_the_columns_declared_once(ledger):
    """Row's fields are the table's columns, in order; the columns later schemas added (not Row fields)
    follow; each column's type and NOT NULL are what its declaration says."""
    from dataclasses import fields

    from nst_batch.batch.ledger import COLUMNS, Row
    from nst_batch.batch.ledger.schema import ADDED, PAIRS

    table = ledger.db.execute("PRAGMA table_info(pairs)").fetchall()
    names = [r["name"] for r in table]
    assert [f.name for f in fields(Row)] == list(COLUMNS) == names[:len(COLUMNS)]
    assert names[len(COLUMNS):] == [c.name for c in ADDED]
    for r, c in zip(table, PAIRS, strict=True):
        assert (r["name"], r["type"], bool(r["notnull"])) == (c.name, c.sql.split()[0], "NOT NULL" in c.sql)


# The text of sqlite_master of a new ledger, as every nst-batch of schema 7 has written it: a change
# here means a new ledger differs on disk from one an earlier version wrote. (Schema 6's was 00090b78...,
# schema 5's 5dd7a183...; a ledger migrated has the same text as a new one: test_a_schema_6_ledger_...)
_SCHEMA_7_SHA256 = "ecbb427df9b70347f547d58eac68fe0f3c90597e7f833a31d55dcb51239e5609"
_SCHEMA_6_SHA256 = "00090b783c53d066932822a11d0b9746203ea059d8ff5d6e1db779a1cb9f5360"


def _schema_sha(db) -> str:
    import hashlib

    rows = [tuple(r) for r in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_a_new_ledger_has_the_schema_text_of_schema_7(ledger):
    assert _schema_sha(ledger.db) == _SCHEMA_7_SHA256


def test_a_schema_6_ledger_gains_the_model_of_each_pair_and_keeps_its_rows(out):
    """A schema 6 file as this code's own declarations write it (each schema's statements up to 6), with
    a pair made by a network, one by optimisation, one pending and a model: readers read it as it is (no
    model of any pair); a worker adds pairs.model, keeps every row, and records a network pair's model."""
    from nst_batch.batch.ledger.schema import statements

    out.mkdir()
    db = sqlite3.connect(out / FILENAME)
    for v in range(1, 7):
        for stmt in statements(v):
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '6')")
    assert _schema_sha(db) == _SCHEMA_6_SHA256  # what every nst-batch of schema 6 wrote
    for i, (state, method) in enumerate((("done", "network"), ("done", "optimize"), ("pending", None))):
        db.execute("INSERT INTO pairs (content, style, content_path, style_path, output, recipe, state, attempts, "
                   "finished_at, steps, total_loss, curve, method) VALUES (?, 's.png', ?, '/st/s.png', ?, 'r1', ?, "
                   "1, 100.0, 3, 3.1, '[[3,32,1,2,3.1]]', ?)", (f"{i}.png", f"/in/{i}.png", f"s/{i}.png", state, method))
    db.execute("INSERT INTO models VALUES ('s.png', 'm1', 4, 4, 100.0, '[[4,32,1,2,0,3,0.1]]', 2, '[\"0.png\", \"1.png\"]')")
    db.commit()
    before = [tuple(r) for r in db.execute("SELECT * FROM pairs ORDER BY id")]
    model_before = db.execute("SELECT * FROM models").fetchall()
    db.close()
    with Ledger(out, readonly=True) as ro:
        assert ro.get_meta("schema_version") == 6  # untouched by readers
        assert ro.pair_models() == {}
        assert ro.made_counts() == {("s.png", "network", None): 1, ("s.png", "optimize", None): 1}
    with Ledger(out) as led:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 7
        assert [tuple(r)[:-1] for r in led.db.execute("SELECT * FROM pairs ORDER BY id")] == before
        assert [r["model"] for r in led.db.execute("SELECT model FROM pairs")] == [None, None, None]
        assert [tuple(r) for r in led.db.execute("SELECT * FROM models")] == model_before
        assert _schema_sha(led.db) == _SCHEMA_7_SHA256  # migrated, it is what a new ledger is
        r = led.claim("w:1", LEASE)
        assert r.content == "2.png"
        assert led.done(Finished(r.id, "w:1", 3, 1.0, 2.0, 0.1, 3.1, method="network", model="m1"))
        assert led.pair_models() == {("2.png", "s.png"): "m1"}
        assert led.made_counts() == {("s.png", "network", None): 1, ("s.png", "network", "m1"): 1,
                                     ("s.png", "optimize", None): 1}
        led.db.execute("UPDATE pairs SET state='pending' WHERE id=?", (r.id,))
        led.claim("w:1", LEASE, only={r.id})
        assert led.pair_models() == {}  # a new attempt: the model of the one before is not its model


def test_states_round_trip_through_the_ledger(ledger, out):
    from nst_batch.batch.ledger import STATES, State

    assert STATES == ("pending", "running", "done", "failed") == tuple(State)
    ledger.sync([pair(f"{s}.png") for s in State], out, LEASE)
    for s in State:
        assert f"{s}" == str(s) == s.value  # as SQL built with f-strings sees it
        ledger.db.execute("UPDATE pairs SET state=? WHERE content=?", (s, f"{s.value}.png"))  # bound as a str
    for r in ledger.rows():
        assert State(r.state) is State(r.content[:-4]) and r.state == State(r.state)
        assert type(r.state) is str  # what SQLite gives back, equal to its State
    assert ledger.counts() == dict.fromkeys(STATES, 1)
    with pytest.raises(sqlite3.IntegrityError):  # the table's CHECK lists every State, and only those
        ledger.db.execute("UPDATE pairs SET state='paused' WHERE id=1")


def _shard_ledgers(out: Path) -> None:
    """Two shard ledgers of OUT: pairs done, failed, pending and running, a model, settings."""
    from nst_batch.batch.shards import Shard

    for k in range(2):
        led = Ledger(Shard(2, k).folder(out))
        try:
            led.sync([pair(f"{k}{i}.png", f"s{i % 2}.png") for i in range(6)], out, LEASE)
            for i in range(4):
                r = led.claim("w:1", LEASE)
                if i == 3:
                    led.fail(r.id, "w:1", "oom", "too big")
                else:
                    led.done(Finished(r.id, "w:1", 3, 1.0, 2.0, 0.1, 3.0 + i + k, finished_at=100.0 + 10 * i + k,
                                      seconds=1.0 + i * 2 + k, method="network" if i == k else "optimize",
                                      model=f"m{k}" if i == k else None, curve=f"[[{k}{i}]]"))
            led.claim("w:1", LEASE)
            led.set_model(f"s{k}.png", f"m{k}", 5, 10)
            led.set_model("s9.png", f"m{k}", 5 + k, 10)  # recorded by both: the union shows the later record
            led.db.execute("UPDATE models SET updated_at=? WHERE style='s9.png'", (1000.0 + k,))
            if k == 1:
                led.store_settings({"size": 32})
                led.set_meta("skipped", ["x"])
        finally:
            led.close()


def test_a_ledger_set_forwards_each_reader_and_merges_the_answers(out):
    """Each reader over two shard ledgers equals the answer made from each shard's by hand: rows with
    union ids (local id x 2 + K), counts summed, the latest record of a model both shards recorded."""
    from dataclasses import replace

    from nst_batch.batch.ledger import open_ledgers
    from nst_batch.batch.shards import Shard

    _shard_ledgers(out)
    parts = [(Shard(2, k), Ledger(Shard(2, k).folder(out), readonly=True)) for k in range(2)]
    try:
        def union(rows, k):
            return [replace(r, id=r.id * 2 + k) for r in rows]

        (_, a), (_, b) = parts
        with open_ledgers(out) as lset:
            assert [k for k, _ in lset.parts] == [s for s, _ in parts]
            assert lset.rows() == sorted(union(a.rows(), 0) + union(b.rows(), 1), key=lambda r: r.id)
            assert lset.failed_rows() == sorted(union(a.failed_rows(), 0) + union(b.failed_rows(), 1),
                                                key=lambda r: r.id)
            both = union(a.top_done("total_loss", 3), 0) + union(b.top_done("total_loss", 3), 1)
            assert lset.top_done("total_loss", 3) == sorted(both, key=lambda r: (-r.total_loss, r.id))[:3]
            assert lset.outputs() == a.outputs() + b.outputs()
            assert lset.counts() == {s: a.counts()[s] + b.counts()[s] for s in a.counts()}
            assert lset.counts() == {"pending": 2, "running": 2, "done": 6, "failed": 2}
            assert lset.method_counts() == {"optimize": 4, "network": 2}
            assert lset.methods() == a.methods() | b.methods() and len(lset.methods()) == 6
            assert lset.pair_models() == a.pair_models() | b.pair_models() and set(lset.pair_models().values()) == {"m0", "m1"}
            assert lset.made_counts() == {k: a.made_counts().get(k, 0) + b.made_counts().get(k, 0)
                                          for k in a.made_counts().keys() | b.made_counts().keys()}
            assert sum(n for (_, m, _), n in lset.made_counts().items() if m == "network") == 2
            secs = a.done_seconds()[0] + b.done_seconds()[0]
            assert lset.done_seconds() == (secs, min(a.done_seconds()[1], b.done_seconds()[1]),
                                           max(a.done_seconds()[2], b.done_seconds()[2]))
            assert lset.models() == a.models() | b.models() and lset.models()["s9.png"]["recipe"] == "m1"
            assert lset.stored_settings() == {"size": 32} == b.stored_settings() and a.stored_settings() == {}
            assert lset.get_meta("skipped", "dflt") == ["x"] and lset.get_meta("nothing", "dflt") == "dflt"
            assert lset.live_workers() == []
            done = [r for r in lset.rows() if r.state == "done"]
            assert lset.curves(r.id for r in done) == {r.id: f"[[{r.id % 2}{r.id // 2 - 1}]]" for r in done}
            assert LedgerSet.rows.__doc__ and lset.rows.__name__ == "rows"
    finally:
        for _, led in parts:
            led.close()


def test_a_schema_5_ledger_keeps_its_models_and_gains_the_photos_they_trained_on(out):
    """Schema 5 is schema 6 without models.photos and models.trained_on: a model stored before reads with
    neither; a worker adds the columns, and a model recorded since says what it trained on."""
    led = Ledger(out)
    led.set_model("s.png", "r1", 4, 4, "[[4,32,1,2,0,3,0.1]]")
    led.close()
    as_schema(out, 5, "ALTER TABLE pairs DROP COLUMN model", "ALTER TABLE models DROP COLUMN photos", "ALTER TABLE models DROP COLUMN trained_on")
    ro = Ledger(out, readonly=True)
    try:
        assert ro.models()["s.png"]["recipe"] == "r1" and "photos" not in ro.models()["s.png"]
    finally:
        ro.close()
    led = Ledger(out)
    try:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == 7
        assert led.models()["s.png"]["step"] == 4 and led.models()["s.png"]["photos"] is None
        led.set_model("t.png", "r2", 2, 4, None, ["a.png", "b.png"])
        assert led.models()["t.png"]["photos"] == 2
        assert json.loads(led.models()["t.png"]["trained_on"]) == ["a.png", "b.png"]
        fresh = Ledger(out / "fresh")
        try:
            assert _master(led) == _master(fresh)  # migrated, it is what a new ledger is
        finally:
            fresh.close()
    finally:
        led.close()


def _master(led: Ledger) -> list[tuple]:
    return [tuple(r) for r in led.db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY rowid")]
