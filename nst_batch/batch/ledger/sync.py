"""The ledger brought in line with a plan (`sync`), and failed pairs sent back to be made (`retry`).

Sized for whole collections: `sync` reads only the columns it compares and writes only what changed,
so an unchanged plan of 200,000 pairs writes nothing; an output's presence is one directory listing
per folder, not one stat per pair.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from .claims import live_claim
from .connection import Connection
from .schema import State

# Plain str values: compared once per pair of a 200,000-pair plan.
_PENDING, _RUNNING, _DONE, _FAILED = (State.PENDING.value, State.RUNNING.value, State.DONE.value,
                                      State.FAILED.value)


def output_exists(out: Path) -> Callable[[str], bool]:
    """rel path -> is it a file in `out`. One directory listing per folder instead of one stat per
    pair (200,000 done pairs live in 20 folders). A name not in the listing is asked of the file
    system itself, which also settles names it compares otherwise (case, Unicode normalization)."""
    listed: dict[str, set[str]] = {}
    root = str(out)

    def exists(rel: str) -> bool:
        folder, _, name = rel.rpartition("/")
        names = listed.get(folder)
        if names is None:
            try:
                with os.scandir(os.path.join(root, folder)) as it:
                    names = listed[folder] = {e.name for e in it if e.is_file()}
            except OSError:
                names = listed[folder] = set()
        return name in names or os.path.isfile(os.path.join(root, rel))

    return exists


class Sync(Connection):
    def sync(self, pairs: Iterable, out: Path, lease_s: float) -> dict[str, int]:
        """Bring the ledger in line with a plan. Returns counts of what changed.

        New pairs become pending. A done pair whose output file is gone, or whose recipe changed
        (inputs or settings), becomes pending again; so does a failed pair whose recipe changed.
        Pairs no longer in the plan and not done are dropped. A live claim is never touched.
        """
        now = time.time()
        counts = {"new": 0, "redo": 0, "dropped": 0}
        exists = output_exists(out)
        inserts, resets, moves = [], [], []
        with self._tx():
            cur = self.db.cursor()
            cur.row_factory = None  # plain tuples, only the columns compared: 200,000 rows on a resume
            existing = {(r[0], r[1]): r for r in cur.execute(
                "SELECT content, style, id, output, recipe, state, worker, heartbeat, content_path, style_path "
                "FROM pairs")}
            for p in pairs:
                r = existing.pop((p.content, p.style), None)
                cpath, spath = str(p.content_path), str(p.style_path)
                if r is None:
                    inserts.append((p.content, p.style, cpath, spath, p.output, p.recipe))
                    continue
                _, _, pid, output, recipe, state, worker, heartbeat, old_cpath, old_spath = r
                if state == _RUNNING and live_claim(state, heartbeat, worker, now, lease_s):
                    continue
                changed = recipe != p.recipe or output != p.output
                missing = state == _DONE and not changed and not exists(output)
                if changed or missing or state == _RUNNING:
                    if changed or missing:
                        counts["redo"] += 1
                    # A failed pair is left failed unless its recipe changed: `retry` re-runs it.
                    if not (state == _FAILED and not changed):
                        resets.append((p.recipe, p.output, cpath, spath, pid))
                        continue
                if (cpath, spath) != (old_cpath, old_spath):
                    moves.append((cpath, spath, pid))  # same files (same recipe), folders moved
            # Left over: pairs no longer in the plan. A stale claim (dead worker, expired lease) is as
            # unfinished as a pending pair: were it kept, the next claim would make a pair that is no
            # longer in the plan.
            drops = [(r[2],) for r in existing.values() if r[5] in (_PENDING, _FAILED)
                     or (r[5] == _RUNNING and not live_claim(r[5], r[7], r[6], now, lease_s))]
            self.db.executemany(
                "INSERT INTO pairs (content, style, content_path, style_path, output, recipe, state) "
                f"VALUES (?, ?, ?, ?, ?, ?, '{_PENDING}')", inserts)
            self.db.executemany(
                f"UPDATE pairs SET state='{_PENDING}', recipe=?, output=?, content_path=?, style_path=?, "
                "worker=NULL, heartbeat=NULL WHERE id=?", resets)
            self.db.executemany("UPDATE pairs SET content_path=?, style_path=? WHERE id=?", moves)
            self.db.executemany("DELETE FROM pairs WHERE id=?", drops)
        counts["new"], counts["dropped"] = len(inserts), len(drops)
        return counts

    def requeue_failed(self, kinds: Iterable[str] | None = None, plan: Iterable | None = None) -> list[int]:
        """Failed pairs (optionally of some error kinds) back to pending; returns their ids.
        With a plan, each takes the plan's recipe, output and paths (a retry's settings and inputs)."""
        fresh = {(p.content, p.style): p for p in plan or ()}
        with self._tx():
            rows = self.db.execute("SELECT id, content, style, error_kind FROM pairs WHERE state=?",
                                   (_FAILED,)).fetchall()
            kinds = set(kinds) if kinds is not None else set()  # once: a generator is good for one pass
            ids = []
            for r in rows:
                if kinds and r["error_kind"] not in kinds:
                    continue
                p = fresh.get((r["content"], r["style"]))
                if plan is not None and p is None:
                    continue  # its input is gone: nothing to retry
                ids.append(r["id"])
                if p is None:
                    self.db.execute("UPDATE pairs SET state=? WHERE id=?", (_PENDING, r["id"]))
                else:
                    self.db.execute("UPDATE pairs SET state=?, recipe=?, output=?, content_path=?, "
                                    "style_path=? WHERE id=?",
                                    (_PENDING, p.recipe, p.output, str(p.content_path), str(p.style_path), r["id"]))
        return ids
