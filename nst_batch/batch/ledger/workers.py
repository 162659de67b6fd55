"""The workers on one ledger (table workers) and the settings each makes pixels with.

Each worker registers the settings it makes pixels with, kept alive by its heartbeat: a worker with
other settings is refused while one is live, since each would send the other's pairs back to be
made its own way. A worker of this machine whose process is gone holds nothing, whatever its lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from ...errors import ConfigError
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


class Workers(Connection):
    def register(self, worker: str, settings: dict[str, Any], lease_s: float) -> None:
        """Record that `worker` makes pixels with `settings` (plan.recipe_settings). ConfigError, one
        line naming the keys, if a live worker on this ledger has other settings: each would send the
        other's pairs back to pending under its own recipe. Checked and recorded in one transaction,
        so of two workers starting together the second one sees the first."""
        now = time.time()
        mine = json.loads(json.dumps(settings, sort_keys=True, default=str))
        with self._tx():
            for r in self.db.execute("SELECT * FROM workers WHERE worker != ?", (worker,)).fetchall():
                if r["heartbeat"] <= now - r["lease_s"] or is_dead(r["worker"]):
                    self.db.execute("DELETE FROM workers WHERE worker=?", (r["worker"],))  # gone: forget it
                    continue
                theirs = json.loads(r["settings"])
                diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                if diff:
                    said = ", ".join(f"{k} {_show(mine.get(k))} here vs {_show(theirs.get(k))} there" for k in diff)
                    raise ConfigError(f"another worker ({r['worker']}) is running on {self.path.parent} with "
                                      f"different settings: {said}; wait for it to finish or use another "
                                      "output folder")
            self.db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?)",
                            (worker, json.dumps(mine, sort_keys=True), lease_s, now, now))

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
