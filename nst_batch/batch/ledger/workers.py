"""The workers on one ledger (table workers) and the settings each makes pixels with.

Each worker registers the settings it makes pixels with, kept alive by its heartbeat: a worker with
other settings is refused while one is live, since each would send the other's pairs back to be
made its own way. A worker of this machine whose process is gone holds nothing, whatever its lease.

The shards of one output folder are held to one set of settings too: they share its networks
(OUT/models/<style>.pt, one per style, whose recipe follows the settings) and its report. A shard's
worker is refused while a worker live on another shard's ledger has other settings. Those ledgers may
be written by other hosts: they are only read, and a worker there is live while its heartbeat is
younger than its lease (or, of this host, while its process is there).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from ...errors import ConfigError
from ..shards import found
from .connection import Connection


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_dead(worker: str | None) -> bool:
    """True for a worker of this machine whose process is gone: its claim need not wait for the lease."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _show(v: Any) -> str:
    return "(unset)" if v is None else v if isinstance(v, str) else json.dumps(v)


def _live(r: sqlite3.Row, now: float) -> bool:
    return r["heartbeat"] > now - r["lease_s"] and not is_dead(r["worker"])


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """'size 48 here vs 32 there, ...' for each key the two settings differ in; None when they agree."""
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    return ", ".join(f"{k} {_show(mine.get(k))} here vs {_show(theirs.get(k))} there" for k in diff) or None


def _other_shards(ledger: Path) -> Iterator[tuple[str, Path]]:
    """(name, ledger file) of every other shard of the output folder that `ledger` (a shard's) is in."""
    out = ledger.parent.parent.parent
    for shard in found(out):
        path = shard.folder(out) / ledger.name
        if path.parent != ledger.parent:
            yield str(shard), path


def _shard_workers(path: Path) -> list[sqlite3.Row]:
    """The workers registered on another shard's ledger, read-only (it may be another host's: nothing is
    written to it, not even a migration); none when it cannot be read (a ledger before schema 2 has no
    table workers, a damaged one is that shard's own business)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM workers").fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()


class Workers(Connection):
    def register(self, worker: str, settings: dict[str, Any], lease_s: float) -> None:
        """Record that `worker` makes pixels with `settings` (plan.recipe_settings). ConfigError, one
        line naming the keys, if a live worker on this ledger has other settings: each would send the
        other's pairs back to pending under its own recipe. Checked and recorded in one transaction,
        so of two workers starting together the second one sees the first. On a shard's ledger, the
        workers live on the other shards' ledgers are checked as well (`_check_other_shards`)."""
        now = time.time()
        mine = json.loads(json.dumps(settings, sort_keys=True, default=str))
        with self._tx():
            for r in self.db.execute("SELECT * FROM workers WHERE worker != ?", (worker,)).fetchall():
                if not _live(r, now):
                    self.db.execute("DELETE FROM workers WHERE worker=?", (r["worker"],))  # gone: forget it
                    continue
                if said := _differences(mine, json.loads(r["settings"])):
                    raise ConfigError(f"another worker ({r['worker']}) is running on {self.path.parent} with "
                                      f"different settings: {said}; wait for it to finish or use another "
                                      "output folder")
            self.db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?)",
                            (worker, json.dumps(mine, sort_keys=True), lease_s, now, now))
        if self.shard_ledger:
            self._check_other_shards(worker, mine)

    def _check_other_shards(self, worker: str, mine: dict[str, Any]) -> None:
        """ConfigError, naming the keys and the shard, when a worker live on another shard's ledger of this
        output folder has other settings; this worker's registration is taken back first. Checked after
        registering: of two shards starting together with different settings, each sees the other (or
        one sees the other's registration), so they never both go on."""
        now = time.time()
        for name, path in _other_shards(self.path):
            for r in _shard_workers(path):
                if r["worker"] == worker or not _live(r, now):
                    continue
                if said := _differences(mine, json.loads(r["settings"])):
                    self.unregister(worker)
                    raise ConfigError(f"shard {name} is running on {self.path.parent.parent.parent} ({r['worker']}) "
                                      f"with different settings: {said}; the shards of one output folder share "
                                      "its networks and report: start this one with the same settings, or once "
                                      "that one has finished")

    def live_workers(self) -> list[tuple[str, float, float]]:
        """(worker, seconds since its heartbeat, its lease_s) of every registered worker still live."""
        now = time.time()
        return [(r["worker"], now - r["heartbeat"], r["lease_s"]) for r in self.db.execute("SELECT * FROM workers")
                if r["heartbeat"] > now - r["lease_s"] and not is_dead(r["worker"])]

    def worker_heartbeat(self, worker: str) -> None:
        with self._tx():
            self.db.execute("UPDATE workers SET heartbeat=? WHERE worker=?", (time.time(), worker))

    def unregister(self, worker: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM workers WHERE worker=?", (worker,))
