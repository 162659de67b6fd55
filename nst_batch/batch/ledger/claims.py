"""Claims: the one place a pair is taken to be made, held, and given back.

A pair is claimed atomically (BEGIN IMMEDIATE) and held by a heartbeat; a claim whose heartbeat is
older than the lease, or whose worker is a process of this machine that is gone, has lapsed and is
free to take again. A claim is an indexed `ORDER BY id LIMIT` query: the same cost whatever the
ledger holds (10,000 photos x 20 styles = 200,000 pairs).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .connection import Connection
from .schema import OUTCOME, Row, State, row
from .workers import is_dead

Recipes = Mapping[tuple[str, str], str]  # (content, style) -> recipe, as a worker's plan has them

# Pending rows looked at per query while stepping over rows of another recipe.
_STEP = 16

# A new attempt: this worker's, counted, and nothing left of the attempt before.
_CLAIMED = (f"state='{State.RUNNING}', worker=?, heartbeat=?, started_at=?, attempts=attempts+1, "
            + ", ".join(f"{c}=NULL" for c in OUTCOME))

_PENDING = f"SELECT * FROM pairs WHERE state='{State.PENDING}'"
_PENDING_ONLY = ("SELECT p.* FROM temp.claim_only AS o CROSS JOIN pairs AS p ON p.id = o.id "
                 f"WHERE p.state='{State.PENDING}'")
_RUNNING = f"state='{State.RUNNING}'"


Accept = Callable[[str], bool]  # a row's content_path -> whether this claim may take it


def ours(r: sqlite3.Row, recipes: Recipes | None, accept: Accept | None = None) -> bool:
    return ((recipes is None or recipes.get((r["content"], r["style"])) == r["recipe"])
            and (accept is None or accept(r["content_path"])))


def live_claim(state: str, heartbeat: float | None, worker: str | None, now: float, lease_s: float) -> bool:
    """Whether a pair is held by a claim that has not lapsed: `sync` leaves such a pair alone."""
    return state == State.RUNNING and (heartbeat or 0) > now - lease_s and not is_dead(worker)


@dataclass
class _Retry:
    """A retry's ids, mirrored in temp.claim_only (this connection's own table), and per style
    claimed by (None: any) the highest id taken so far: see Claims._next."""

    ids: frozenset[int]
    floors: dict[str | None, int] = field(default_factory=dict)


class Claims(Connection):
    _retry: _Retry | None = None  # set by the first claim with `only`

    def claim(self, worker: str, lease_s: float, only: set[int] | None = None, style: str | None = None,
              recipes: Recipes | None = None, accept: Accept | None = None) -> Row | None:
        """Atomically take the next pending pair (or one whose claim expired); None when none is left.
        With `only` (a retry's ids), only one of those. With `style`, only a pair of that style (to
        fill a batch). With `recipes` ((content, style) -> recipe, from the worker's own plan), only a
        pair whose stored recipe is the one this worker makes: checked inside the claim's
        transaction, so what it renders is what the ledger says. With `accept`, only a pair whose
        photo it accepts (one of the batch's working shape). The lowest id goes first."""
        now = time.time()
        self._set_only(only)
        with self._tx():
            r = self._next(only, style, recipes, (now, lease_s), claiming=True, accept=accept)
            if r is None:
                return None
            self.db.execute(f"UPDATE pairs SET {_CLAIMED} WHERE id=?", (worker, now, now, r["id"]))
            return row(self.db.execute("SELECT * FROM pairs WHERE id=?", (r["id"],)).fetchone())

    def peek(self, only: set[int] | None = None, recipes: Recipes | None = None) -> Row | None:
        """The pair a claim would most likely take next, without claiming it (for prefetching)."""
        self._set_only(only)
        r = self._next(only, None, recipes, None)
        return None if r is None else row(r)

    def heartbeat(self, pair_id: int, worker: str) -> None:
        with self._tx():
            self.db.execute(f"UPDATE pairs SET heartbeat=? WHERE id=? AND worker=? AND {_RUNNING}",
                            (time.time(), pair_id, worker))

    def release(self, pair_id: int, worker: str, started: bool = True) -> None:
        """Give an interrupted pair back: pending again. The attempt stays counted, so the loss-log rows
        it wrote keep an attempt number that no later attempt reuses; started=False takes it back, for
        a claim that never began (queued on a Ray actor that died) and so wrote no row."""
        with self._tx():
            # Only a claim still running: a Ctrl-C that lands just after the pair was recorded done
            # (or failed) must not send it back to be made again.
            self.db.execute(f"UPDATE pairs SET state='{State.PENDING}', worker=NULL, heartbeat=NULL, "
                            f"attempts=attempts-? WHERE id=? AND worker=? AND {_RUNNING}",
                            (0 if started else 1, pair_id, worker))

    def _next(self, only: set[int] | None, style: str | None, recipes: Recipes | None,
              stale: tuple[float, float] | None, claiming: bool = False,
              accept: Accept | None = None) -> sqlite3.Row | None:
        """The first claimable row by id: a pending one, found through an index, or (given `stale`,
        (now, lease_s)) a running one whose claim lapsed. Each query reads a few rows whatever the
        ledger's size, so a claim costs the same at 200 pairs and at 200,000."""
        best = self._first_stale(only, style, recipes, *stale, accept) if stale is not None else None
        if only is None:
            sql = _PENDING + (" AND style=?" if style is not None else "") + \
                " AND id > ? AND id < ? ORDER BY id LIMIT ?"
            floors, floor = None, 0
        else:  # the retry's ids drive the search: a handful of failures among 200,000 pairs
            sql = _PENDING_ONLY + (" AND p.style=?" if style is not None else "") + \
                " AND o.id > ? AND o.id < ? ORDER BY o.id LIMIT ?"
            # Below the floor, the retry's ids were all taken already: not read again, so the
            # claims of a long retry do not slow down. Nothing found above it: one full look.
            floors = self._retry.floors
            floor = floors.get(style, 0)
        head = (style,) if style is not None else ()
        after, before = floor, best["id"] if best is not None else 2 ** 63 - 1
        while True:  # keyset: steps over pending rows stored under another recipe
            rows = self.db.execute(sql, (*head, after, before, _STEP)).fetchall()
            for r in rows:
                if ours(r, recipes, accept):
                    if claiming and floors is not None and accept is None:  # rows passed over by
                        floors[style] = r["id"]  # `accept` are still pending below this one
                    return r
            if len(rows) == _STEP:
                after = rows[-1]["id"]
            elif floor:
                after = floor = 0
            else:
                return best

    def _first_stale(self, only: set[int] | None, style: str | None, recipes: Recipes | None, now: float,
                     lease_s: float, accept: Accept | None = None) -> sqlite3.Row | None:
        """The first running row whose claim lapsed: heartbeat older than the lease (judged in SQL), or
        held by a process of this machine that is gone (judged once per worker, not per row)."""
        workers = [w for (w,) in self.db.execute(f"SELECT DISTINCT worker FROM pairs WHERE {_RUNNING}")]
        dead = [w for w in workers if is_dead(w)]
        for r in self.db.execute(
                f"SELECT * FROM pairs WHERE {_RUNNING} AND style=COALESCE(?, style) AND "
                f"(COALESCE(heartbeat, 0) <= ? OR worker IN ({','.join('?' * len(dead))})) ORDER BY id",
                (style, now - lease_s, *dead)):
            if (only is None or r["id"] in only) and ours(r, recipes, accept):
                return r
        return None

    def _set_only(self, only: set[int] | None) -> None:
        """Mirror `only` into temp.claim_only, rebuilt only when it changes."""
        if only is None or (self._retry is not None and only == self._retry.ids):
            return
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS claim_only (id INTEGER PRIMARY KEY)")
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM temp.claim_only")
        self.db.executemany("INSERT INTO temp.claim_only VALUES (?)", [(i,) for i in only])
        self.db.execute("COMMIT")
        self._retry = _Retry(frozenset(only))
