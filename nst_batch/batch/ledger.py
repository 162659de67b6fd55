"""The run ledger: OUT/ledger.sqlite, what is done, failed, running or still to do.

SQLite in WAL mode: readers (`status`, `report`) never block a worker, every change is one
short transaction, and `kill -9` at any moment leaves the last committed state. Several
workers share one ledger: a pair is claimed atomically (BEGIN IMMEDIATE) and held by a
heartbeat; a claim whose heartbeat is older than the lease is free to take again. Each worker
also registers the settings it makes pixels with (table `workers`, kept alive by the same
heartbeat): a worker with other settings is refused while one is live, since each would send
the other's pairs back to be made its own way.

Sized for whole collections (10,000 photos x 20 styles = 200,000 pairs): a claim is an indexed
`ORDER BY id LIMIT` query, the same cost whatever the ledger holds; `sync` of an unchanged plan
writes nothing; `status` reads aggregates, not rows; input hashes are kept (table `files`) so an
unchanged file is not read again.

A shard's ledger (OUT/shards/K-of-N/ledger.sqlite, see shards.py) is in rollback-journal mode
instead (journal_mode=DELETE, synchronous=FULL): WAL needs shared memory between the processes, which a
network filesystem does not give, and a shard has one writer host. `open_ledgers` reads all of an
output folder's ledgers as one (`LedgerSet`), for `status`, `report` and `retry`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, replace as _replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError
from ..files.layout import LEDGER, SHARDS
from .shards import Shard, found

SCHEMA_VERSION = 5  # 2: workers table; 3: files table, (state, style) index; 4: pairs.curve; 5: models, pairs.method
FILENAME = LEDGER
STATES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id            INTEGER PRIMARY KEY,
    content       TEXT NOT NULL,      -- relative to the content folder
    style         TEXT NOT NULL,      -- relative to the style folder
    content_path  TEXT NOT NULL,
    style_path    TEXT NOT NULL,
    output        TEXT NOT NULL,      -- relative to the output folder
    recipe        TEXT NOT NULL,      -- hash of inputs + settings that made / will make the output
    state         TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    error_kind    TEXT,
    error_message TEXT,
    note          TEXT,               -- e.g. "retried at 362 px after running out of memory"
    worker        TEXT,
    heartbeat     REAL,
    started_at    REAL,
    finished_at   REAL,
    seconds       REAL,
    steps         INTEGER,
    content_loss  REAL,
    style_loss    REAL,
    tv_loss       REAL,
    total_loss    REAL,
    UNIQUE (content, style)
);
CREATE INDEX IF NOT EXISTS pairs_state ON pairs (state);
"""

# Schema 2. A live row (fresh heartbeat, process not known dead) holds the output folder to its settings.
_WORKERS = """
CREATE TABLE IF NOT EXISTS workers (
    worker     TEXT PRIMARY KEY,          -- host:pid
    settings   TEXT NOT NULL,             -- JSON of plan.recipe_settings: what makes its pixels
    lease_s    REAL NOT NULL,
    heartbeat  REAL NOT NULL,
    started_at REAL NOT NULL
);
"""

# Schema 3. What plan.HashCache learnt: a file whose size and mtime are unchanged keeps its hash.
# The second index serves claims of one style (filling a batch): (state, style, rowid) in order.
_FILES = """
CREATE TABLE IF NOT EXISTS files (
    path     TEXT PRIMARY KEY,            -- absolute, as the plan found it
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pairs_state_style ON pairs (state, style);
"""

# Schema 4. A done pair's loss curve, thinned (losslog.curve_record): the report draws it without
# reading losses.csv. Not a Row field: 200,000 of them are read a page at a time (Ledger.curves).
_CURVE = "ALTER TABLE pairs ADD COLUMN curve TEXT"

# Schema 5 (issue 13). The method that made a done pair (optimize or network; NULL: made before, by
# optimisation), and each style's learned network: its recipe (training.model_recipe), how far its
# training got (the checkpoint OUT/models/<style>.pt holds that step) and its training curve.
_MODELS = """
ALTER TABLE pairs ADD COLUMN method TEXT;
CREATE TABLE IF NOT EXISTS models (
    style      TEXT PRIMARY KEY,          -- relative to the style folder, as pairs.style
    recipe     TEXT NOT NULL,
    step       INTEGER NOT NULL,          -- training steps in the checkpoint
    steps      INTEGER NOT NULL,          -- network_steps: trained when step reaches it
    updated_at REAL NOT NULL,
    curve      TEXT                       -- losslog.curve_record of the training losses
)
"""

COLUMNS = ("id", "content", "style", "content_path", "style_path", "output", "recipe", "state", "attempts",
           "error_kind", "error_message", "note", "worker", "heartbeat", "started_at", "finished_at", "seconds",
           "steps", "content_loss", "style_loss", "tv_loss", "total_loss")


@dataclass(frozen=True)
class Row:
    id: int
    content: str
    style: str
    content_path: str
    style_path: str
    output: str
    recipe: str
    state: str
    attempts: int
    error_kind: str | None
    error_message: str | None
    note: str | None
    worker: str | None
    heartbeat: float | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    steps: int | None
    content_loss: float | None
    style_loss: float | None
    tv_loss: float | None
    total_loss: float | None


_SELECT = ", ".join(COLUMNS)


def _row(r: sqlite3.Row) -> Row:
    """A Row from `SELECT *`, whatever columns the schema adds (the curve is not a Row field)."""
    return Row(*(r[c] for c in COLUMNS))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_dead(worker: str | None) -> bool:
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


Recipes = Mapping[tuple[str, str], str]  # (content, style) -> recipe, as a worker's plan has them


def _ours(r, recipes: Recipes | None) -> bool:
    return recipes is None or recipes.get((r["content"], r["style"])) == r["recipe"]


def _show(v: Any) -> str:
    return "(unset)" if v is None else v if isinstance(v, str) else json.dumps(v)


def _live(state: str, heartbeat: float | None, worker: str | None, now: float, lease_s: float) -> bool:
    return state == "running" and (heartbeat or 0) > now - lease_s and not _is_dead(worker)


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


# Pending rows looked at per query while stepping over rows of another recipe.
_STEP = 16
_CLAIMED = ("state='running', worker=?, heartbeat=?, started_at=?, attempts=attempts+1, error_kind=NULL, "
            "error_message=NULL, note=NULL, steps=NULL, seconds=NULL, content_loss=NULL, style_loss=NULL, "
            "tv_loss=NULL, total_loss=NULL, curve=NULL, method=NULL")


class Ledger:
    def __init__(self, out: Path, create: bool = True, readonly: bool = False):
        self.path = out / FILENAME
        if (readonly or not create) and not self.path.is_file():
            raise ConfigError(f"no run ledger in {out} (expected {self.path}); run 'nst-batch run' first")
        if readonly:
            self._open_readonly()
            return
        out.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves, so each is explicit and short.
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self._only: frozenset[int] | None = None  # the ids in temp.claim_only
        self._floors: dict[str | None, int] = {}
        # Decided by where the file is, so every opener (a worker, its heartbeat thread) agrees.
        self.shard_ledger = out.parent.name == SHARDS
        try:
            if self.shard_ledger:
                self.db.execute("PRAGMA journal_mode=DELETE")
                self.db.execute("PRAGMA synchronous=FULL")  # NORMAL can lose a commit in rollback mode
            else:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise ConfigError(f"{self.path}: not a usable ledger ({e}); move it away to start afresh") from None

    def _open_readonly(self) -> None:
        """For `status` and `report`: no migration and no journal-mode change, so no write lock to
        wait for (or to hold) while workers claim pairs."""
        self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                  isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            version = int(self.get_meta("schema_version", 0))
        except (sqlite3.DatabaseError, ValueError) as e:
            self.db.close()
            raise ConfigError(f"{self.path}: not a usable ledger ({e}); move it away to start afresh") from None
        if not 0 < version <= SCHEMA_VERSION:
            self.db.close()
            raise ConfigError(f"{self.path}: schema {version}, this nst-batch knows {SCHEMA_VERSION}; "
                              "use the nst-batch that wrote it")

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
            version = None
            if has_meta:
                r = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(r[0]) if r else None
            if version is not None and version > SCHEMA_VERSION:
                raise ConfigError(f"{self.path} was written by a newer nst-batch (schema {version}, "
                                  f"this one knows {SCHEMA_VERSION}); upgrade nst-batch")
            if version is None:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version is None or version < 2:  # 1 -> 2: a new table, the pairs are kept as they are
                self.db.execute(_WORKERS)
            if version is None or version < 3:  # 2 -> 3: a new table and an index, pairs as they are
                for stmt in _FILES.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version is None or version < 4:  # 3 -> 4: a new nullable column, NULL for pairs made before
                self.db.execute(_CURVE)
            if version is None or version < 5:  # 4 -> 5: a nullable column (NULL: optimised) and a new table
                for stmt in _MODELS.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version != SCHEMA_VERSION:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self):
        return _Tx(self.db)

    # -- settings of the last run, for `retry` and the report -------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def store_settings(self, settings: dict[str, Any]) -> None:
        """The manifest's settings of the last `run` (Settings.to_dict, folders absolute): `retry` re-runs
        failed pairs with them, the report shows them. The one writer; `stored_settings` the one reader."""
        self.set_meta("settings", settings)

    def stored_settings(self) -> dict[str, Any]:
        value = self.get_meta("settings")
        return value if isinstance(value, dict) else {}

    # -- workers and their settings ------------------------------------------------------------
    def register(self, worker: str, settings: dict[str, Any], lease_s: float) -> None:
        """Record that `worker` makes pixels with `settings` (plan.recipe_settings). ConfigError, one
        line naming the keys, if a live worker on this ledger has other settings: each would send the
        other's pairs back to pending under its own recipe. Checked and recorded in one transaction,
        so of two workers starting together the second one sees the first."""
        now = time.time()
        mine = json.loads(json.dumps(settings, sort_keys=True, default=str))
        with self._tx():
            for r in self.db.execute("SELECT * FROM workers WHERE worker != ?", (worker,)).fetchall():
                if r["heartbeat"] <= now - r["lease_s"] or _is_dead(r["worker"]):
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
                if r["heartbeat"] > now - r["lease_s"] and not _is_dead(r["worker"])]

    def worker_heartbeat(self, worker: str) -> None:
        with self._tx():
            self.db.execute("UPDATE workers SET heartbeat=? WHERE worker=?", (time.time(), worker))

    def unregister(self, worker: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM workers WHERE worker=?", (worker,))

    # -- input hashes, for plan.HashCache ---------------------------------------------------------
    @staticmethod
    def stored_hashes(out: Path) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, hash) as the last plan on `out` found them; empty without a
        ledger or with one from before schema 3. Read before planning, so a bad manifest never
        creates OUT."""
        if not (out / FILENAME).is_file():
            return {}
        try:
            led = Ledger(out, readonly=True)
        except ConfigError:
            return {}  # a ledger from a newer nst-batch, or no ledger at all: opening it for the run says so
        try:
            if not led.db.execute("SELECT 1 FROM sqlite_master WHERE name='files'").fetchone():
                return {}
            return {p: (size, mtime, h) for p, size, mtime, h in
                    led.db.execute("SELECT path, size, mtime_ns, hash FROM files")}
        finally:
            led.close()

    def store_hashes(self, put: Mapping[str, tuple[int, int, str]], forget: Iterable[str] = ()) -> None:
        """Write plan.HashCache.changes(): new or changed files, files no longer in the plan."""
        forget = [(p,) for p in forget]
        if not put and not forget:
            return  # an unchanged collection: no write, no lock
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                                [(p, *v) for p, v in put.items()])
            self.db.executemany("DELETE FROM files WHERE path=?", forget)

    # -- planning ---------------------------------------------------------------------------------
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
                if state == "running" and _live(state, heartbeat, worker, now, lease_s):
                    continue
                changed = recipe != p.recipe or output != p.output
                missing = state == "done" and not changed and not exists(output)
                if changed or missing or state == "running":
                    if changed or missing:
                        counts["redo"] += 1
                    # A failed pair is left failed unless its recipe changed: `retry` re-runs it.
                    if not (state == "failed" and not changed):
                        resets.append((p.recipe, p.output, cpath, spath, pid))
                        continue
                if (cpath, spath) != (old_cpath, old_spath):
                    moves.append((cpath, spath, pid))  # same files (same recipe), folders moved
            # Left over: pairs no longer in the plan. A stale claim (dead worker, expired lease) is as
            # unfinished as a pending pair: were it kept, the next claim would make a pair that is no
            # longer in the plan.
            drops = [(r[2],) for r in existing.values()
                     if r[5] in ("pending", "failed") or (r[5] == "running" and not _live(r[5], r[7], r[6], now, lease_s))]
            self.db.executemany(
                "INSERT INTO pairs (content, style, content_path, style_path, output, recipe, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending')", inserts)
            self.db.executemany(
                "UPDATE pairs SET state='pending', recipe=?, output=?, content_path=?, style_path=?, "
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
            rows = self.db.execute("SELECT id, content, style, error_kind FROM pairs WHERE state='failed'").fetchall()
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
                    self.db.execute("UPDATE pairs SET state='pending' WHERE id=?", (r["id"],))
                else:
                    self.db.execute("UPDATE pairs SET state='pending', recipe=?, output=?, content_path=?, "
                                    "style_path=? WHERE id=?",
                                    (p.recipe, p.output, str(p.content_path), str(p.style_path), r["id"]))
        return ids

    # -- claiming and finishing -------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float, only: set[int] | None = None, style: str | None = None,
              recipes: Recipes | None = None) -> Row | None:
        """Atomically take the next pending pair (or one whose claim expired); None when none is left.
        With `only` (a retry's ids), only one of those. With `style`, only a pair of that style (to
        fill a batch). With `recipes` ((content, style) -> recipe, from the worker's own plan), only a
        pair whose stored recipe is the one this worker makes: checked inside the claim's
        transaction, so what it renders is what the ledger says. The lowest id goes first."""
        now = time.time()
        self._set_only(only)
        with self._tx():
            r = self._next(only, style, recipes, (now, lease_s), claiming=True)
            if r is None:
                return None
            self.db.execute(f"UPDATE pairs SET {_CLAIMED} WHERE id=?", (worker, now, now, r["id"]))
            return self.get(r["id"])

    def peek(self, only: set[int] | None = None, recipes: Recipes | None = None) -> Row | None:
        """The pair a claim would most likely take next, without claiming it (for prefetching)."""
        self._set_only(only)
        r = self._next(only, None, recipes, None)
        return None if r is None else _row(r)

    def _next(self, only: set[int] | None, style: str | None, recipes: Recipes | None,
              stale: tuple[float, float] | None, claiming: bool = False) -> sqlite3.Row | None:
        """The first claimable row by id: a pending one, found through an index, or (given `stale`,
        (now, lease_s)) a running one whose claim lapsed. Each query reads a few rows whatever the
        ledger's size, so a claim costs the same at 200 pairs and at 200,000."""
        best = self._first_stale(only, style, recipes, *stale) if stale is not None else None
        if only is None:
            sql = ("SELECT * FROM pairs WHERE state='pending'" + (" AND style=?" if style is not None else "") +
                   " AND id > ? AND id < ? ORDER BY id LIMIT ?")
            floor = 0
        else:  # the retry's ids drive the search: a handful of failures among 200,000 pairs
            sql = ("SELECT p.* FROM temp.claim_only AS o CROSS JOIN pairs AS p ON p.id = o.id "
                   "WHERE p.state='pending'" + (" AND p.style=?" if style is not None else "") +
                   " AND o.id > ? AND o.id < ? ORDER BY o.id LIMIT ?")
            # Below the floor, the retry's ids were all taken already: not read again, so the
            # claims of a long retry do not slow down. Nothing found above it: one full look.
            floor = self._floors.get(style, 0)
        head = (style,) if style is not None else ()
        after, before = floor, best["id"] if best is not None else 2 ** 63 - 1
        while True:  # keyset: steps over pending rows stored under another recipe
            rows = self.db.execute(sql, (*head, after, before, _STEP)).fetchall()
            for r in rows:
                if _ours(r, recipes):
                    if claiming and only is not None:
                        self._floors[style] = r["id"]
                    return r
            if len(rows) == _STEP:
                after = rows[-1]["id"]
            elif floor:
                after = floor = 0
            else:
                return best

    def _first_stale(self, only: set[int] | None, style: str | None, recipes: Recipes | None, now: float,
                     lease_s: float) -> sqlite3.Row | None:
        """The first running row whose claim lapsed: heartbeat older than the lease (judged in SQL), or
        held by a process of this machine that is gone (judged once per worker, not per row)."""
        workers = [w for (w,) in self.db.execute("SELECT DISTINCT worker FROM pairs WHERE state='running'")]
        dead = [w for w in workers if _is_dead(w)]
        for r in self.db.execute(
                "SELECT * FROM pairs WHERE state='running' AND style=COALESCE(?, style) AND "
                f"(COALESCE(heartbeat, 0) <= ? OR worker IN ({','.join('?' * len(dead))})) ORDER BY id",
                (style, now - lease_s, *dead)):
            if (only is None or r["id"] in only) and _ours(r, recipes):
                return r
        return None

    def _set_only(self, only: set[int] | None) -> None:
        """Mirror `only` into a temporary table (this connection's own), rebuilt only when it changes."""
        if only is None or only == self._only:
            return
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS claim_only (id INTEGER PRIMARY KEY)")
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM temp.claim_only")
        self.db.executemany("INSERT INTO temp.claim_only VALUES (?)", [(i,) for i in only])
        self.db.execute("COMMIT")
        self._only = frozenset(only)
        self._floors: dict[str | None, int] = {}  # per style claimed by (None: any), see _next

    def heartbeat(self, pair_id: int, worker: str) -> None:
        with self._tx():
            self.db.execute("UPDATE pairs SET heartbeat=? WHERE id=? AND worker=? AND state='running'",
                            (time.time(), pair_id, worker))

    def _finish(self, pair_id: int, worker: str, sets: str, args: tuple, finished_at: float | None = None,
                recipe: str | None = None, seconds: float | None = None) -> bool:
        """Record the end of a claim that is still this worker's (and, given `recipe`, still for that
        recipe); False, recording nothing, when it is not: its lease ran out and the pair was reset.
        `seconds` defaults to the time since the claim."""
        now = finished_at or time.time()
        with self._tx():
            cur = self.db.execute(
                f"UPDATE pairs SET {sets}, finished_at=?, seconds=COALESCE(?, ? - started_at), heartbeat=NULL "
                "WHERE id=? AND worker=? AND state='running' AND recipe=COALESCE(?, recipe)",
                (*args, now, seconds, now, pair_id, worker, recipe))
            if cur.rowcount == 1:
                return True
            if recipe is not None:
                # Our image may have just replaced the file of a worker that has since made this pair
                # with another recipe and recorded it done: that file is no longer what its recipe says.
                self.db.execute("UPDATE pairs SET state='pending', worker=NULL, heartbeat=NULL "
                                "WHERE id=? AND state='done' AND recipe != ?", (pair_id, recipe))
            return False

    def done(self, pair_id: int, worker: str, steps: int, content: float, style: float, tv: float,
             total: float, note: str | None = None, finished_at: float | None = None,
             recipe: str | None = None, curve: str | None = None, seconds: float | None = None,
             method: str = "optimize") -> bool:
        """Mark done a pair this worker made with `recipe` (the recipe it claimed the pair under).
        False when the claim is no longer this worker's or the pair's recipe has changed since.
        `curve`: its loss curve as losslog.curve_record makes it (a small JSON list), or None;
        `method`: what made it (optimize, network)."""
        return self._finish(pair_id, worker,
                            "state='done', steps=?, content_loss=?, style_loss=?, tv_loss=?, total_loss=?, note=?, "
                            "curve=?, method=?", (steps, content, style, tv, total, note, curve, method),
                            finished_at, recipe, seconds)

    def done_recipes(self) -> dict[tuple[str, str], str]:
        """(content, style) -> recipe of every done pair: what `auto` counts pending photos against."""
        return {(r[0], r[1]): r[2] for r in self.db.execute("SELECT content, style, recipe FROM pairs WHERE state='done'")}

    def methods(self) -> dict[tuple[str, str], str]:
        """(content, style) -> the method that made each done pair ('optimize' for pairs made before the
        column existed; an older ledger opened read-only has no column: all 'optimize')."""
        try:
            rows = self.db.execute("SELECT content, style, COALESCE(method, 'optimize') FROM pairs WHERE state='done'")
            return {(r[0], r[1]): r[2] for r in rows}
        except sqlite3.OperationalError:
            return {(r[0], r[1]): "optimize" for r in self.db.execute("SELECT content, style FROM pairs WHERE state='done'")}

    def method_counts(self) -> dict[str, int]:
        """Done pairs per method, for status."""
        try:
            rows = self.db.execute("SELECT COALESCE(method, 'optimize'), COUNT(*) FROM pairs WHERE state='done' GROUP BY 1")
            return {r[0]: r[1] for r in rows}
        except sqlite3.OperationalError:
            n = self.db.execute("SELECT COUNT(*) FROM pairs WHERE state='done'").fetchone()[0]
            return {"optimize": n} if n else {}

    def set_model(self, style: str, recipe: str, step: int, steps: int, curve: str | None = None) -> None:
        """Record a style's network after its checkpoint is on disk (training.Trainer)."""
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, COALESCE(?, "
                            "(SELECT curve FROM models WHERE style=? AND recipe=?)))",
                            (style, recipe, step, steps, time.time(), curve, style, recipe))

    def models(self) -> dict[str, dict]:
        """style -> {recipe, step, steps, updated_at, curve} ({} for a ledger older than schema 5)."""
        try:
            rows = self.db.execute("SELECT style, recipe, step, steps, updated_at, curve FROM models").fetchall()
        except sqlite3.OperationalError:
            return {}
        return {r[0]: {"recipe": r[1], "step": r[2], "steps": r[3], "updated_at": r[4], "curve": r[5]} for r in rows}

    def fail(self, pair_id: int, worker: str, kind: str, message: str, note: str | None = None) -> None:
        self._finish(pair_id, worker, "state='failed', error_kind=?, error_message=?, note=?",
                     (kind, message, note))

    def release(self, pair_id: int, worker: str, started: bool = True) -> None:
        """Give an interrupted pair back: pending again. The attempt stays counted, so the loss-log rows
        it wrote keep an attempt number that no later attempt reuses; started=False takes it back, for
        a claim that never began (queued on a Ray actor that died) and so wrote no row."""
        with self._tx():
            # Only a claim still running: a Ctrl-C that lands just after the pair was recorded done
            # (or failed) must not send it back to be made again.
            self.db.execute("UPDATE pairs SET state='pending', worker=NULL, heartbeat=NULL, attempts=attempts-? "
                            "WHERE id=? AND worker=? AND state='running'", (0 if started else 1, pair_id, worker))

    # -- reading ------------------------------------------------------------------------------------
    def get(self, pair_id: int) -> Row:
        return _row(self.db.execute("SELECT * FROM pairs WHERE id=?", (pair_id,)).fetchone())

    def rows(self) -> list[Row]:
        return [Row(*r) for r in self.db.execute(f"SELECT {_SELECT} FROM pairs ORDER BY id")]

    def outputs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT output FROM pairs")]

    def done_seconds(self) -> tuple[list[float], float | None, float | None]:
        """For the summary, without loading rows: compute seconds of each done pair (by id), the
        first start and the last finish among them."""
        secs = [r[0] for r in self.db.execute(
            "SELECT seconds FROM pairs WHERE state='done' AND seconds IS NOT NULL ORDER BY id")]
        first, last = self.db.execute("SELECT MIN(started_at), MAX(finished_at) FROM pairs "
                                      "WHERE state='done' AND seconds IS NOT NULL").fetchone()
        return secs, first, last

    def top_done(self, column: str, n: int) -> list[Row]:
        """The n done pairs with the highest `column` (ties: lowest id first)."""
        if column not in ("seconds", "total_loss"):
            raise ValueError(column)
        return [_row(r) for r in self.db.execute(
            f"SELECT * FROM pairs WHERE state='done' AND {column} IS NOT NULL ORDER BY {column} DESC, id LIMIT ?",
            (n,))]

    def curves(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> stored curve (JSON text) of those pairs that have one. Looked up by id, a page's
        pairs at a time, so the report never holds 200,000 curves. Empty for a ledger from before
        schema 4 (read as it is)."""
        if "curve" not in {r[1] for r in self.db.execute("PRAGMA table_info(pairs)")}:
            return {}
        ids = list(ids)
        got: dict[int, str] = {}
        for i in range(0, len(ids), 500):  # well under SQLite's limit on bound parameters
            chunk = ids[i:i + 500]
            got.update(self.db.execute(f"SELECT id, curve FROM pairs WHERE curve IS NOT NULL AND id IN "
                                       f"({','.join('?' * len(chunk))})", chunk).fetchall())
        return got

    def failed_rows(self) -> list[Row]:
        return [_row(r) for r in self.db.execute("SELECT * FROM pairs WHERE state='failed' ORDER BY id")]

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATES, 0)
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM pairs GROUP BY state"):
            c[state] = n
        return c


class LedgerSet:
    """Every ledger of an output folder read as one: the unsharded run's, or each shard's. Read-only.

    The read methods of `Ledger` that `status` and the report use. Ids are made unique across
    shards (local id x N + K), so a row's id names it in the union but not in its shard's ledger."""

    def __init__(self, parts: list[tuple[Shard | None, Ledger]]):
        self.parts = parts
        self.shards = [s for s, _ in parts if s is not None]

    @property
    def folders(self) -> list[Path]:
        """The folder of each ledger: its loss log (losslog.LOSS_LOG) lies beside it."""
        return [led.path.parent for _, led in self.parts]

    def close(self) -> None:
        for _, led in self.parts:
            led.close()

    def __enter__(self) -> "LedgerSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, pick: Callable[[Ledger], list[Row]]) -> list[Row]:
        rows = []
        for shard, led in self.parts:
            got = pick(led)
            rows += got if shard is None else [_replace(r, id=r.id * shard.count + shard.index) for r in got]
        return rows

    def rows(self) -> list[Row]:
        return sorted(self._rows(Ledger.rows), key=lambda r: r.id)

    def failed_rows(self) -> list[Row]:
        return sorted(self._rows(Ledger.failed_rows), key=lambda r: r.id)

    def top_done(self, column: str, n: int) -> list[Row]:
        rows = self._rows(lambda led: led.top_done(column, n))
        return sorted(rows, key=lambda r: (-getattr(r, column), r.id))[:n]

    def outputs(self) -> list[str]:
        return [o for _, led in self.parts for o in led.outputs()]

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATES, 0)
        for _, led in self.parts:
            for k, v in led.counts().items():
                c[k] += v
        return c

    def done_seconds(self) -> tuple[list[float], float | None, float | None]:
        secs, firsts, lasts = [], [], []
        for _, led in self.parts:
            s, first, last = led.done_seconds()
            secs += s
            firsts += [first] if first is not None else []
            lasts += [last] if last is not None else []
        return secs, min(firsts, default=None), max(lasts, default=None)

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The first shard's value that is set (every shard of one manifest stores the same settings)."""
        for _, led in self.parts:
            v = led.get_meta(key)
            if v is not None:
                return v
        return default

    def live_workers(self) -> list[tuple[str, float, float]]:
        return [w for _, led in self.parts for w in led.live_workers()]

    def stored_settings(self) -> dict[str, Any]:
        return next((d for _, led in self.parts if (d := led.stored_settings())), {})

    def methods(self) -> dict[tuple[str, str], str]:
        return {k: v for _, led in self.parts for k, v in led.methods().items()}

    def method_counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for _, led in self.parts:
            for k, v in led.method_counts().items():
                c[k] = c.get(k, 0) + v
        return c

    def models(self) -> dict[str, dict]:
        """Ledger.models; a style trained by several shards shows the first shard's."""
        got: dict[str, dict] = {}
        for _, led in self.parts:
            got = led.models() | got
        return got

    def curves(self, ids: Iterable[int]) -> dict[int, str]:
        """Ledger.curves by union id (local id x N + K for a shard)."""
        ids = list(ids)
        got: dict[int, str] = {}
        for shard, led in self.parts:
            if shard is None:
                got |= led.curves(ids)
                continue
            mine = {i // shard.count: i for i in ids if i % shard.count == shard.index}
            got |= {mine[local]: c for local, c in led.curves(mine).items()}
        return got


def open_ledgers(out: Path) -> LedgerSet:
    """All ledgers of OUT, read-only: OUT/ledger.sqlite, or every OUT/shards/K-of-N/ledger.sqlite.
    ConfigError when there is none."""
    shards = found(out)
    if not shards:
        return LedgerSet([(None, Ledger(out, readonly=True))])
    parts: list[tuple[Shard | None, Ledger]] = []
    try:
        for s in shards:
            parts.append((s, Ledger(s.folder(out), readonly=True)))
    except BaseException:
        LedgerSet(parts).close()
        raise
    return LedgerSet(parts)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so two workers never race a claim."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
