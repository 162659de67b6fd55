"""The ledger's tables and the migrations from every older schema, each column of `pairs` declared once.

`Row` declares the columns a pair is read with: each field carries its SQL in its metadata (see
`column`). `ADDED` declares the columns later schemas brought with ALTER TABLE that are not Row
fields. Everything else is derived from those two: the CREATE TABLE, the SELECT list (`COLUMNS`),
the columns a new claim clears, and which ALTER TABLE each migration runs. The statements a new
ledger runs are the ones every version has run (the base table, then each schema's additions in
turn), so its schema text in sqlite_master is the same, byte for byte, as that of a ledger written
before the columns were declared this way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from ...errors import ConfigError

# 2: workers table; 3: files table, (state, style) index; 4: pairs.curve; 5: models, pairs.method;
# 6: models.photos, models.trained_on (a model's recipe no longer covers its photos: they are recorded);
# 7: pairs.model (the model that made a network-made pair)
SCHEMA_VERSION = 7


class State(str, Enum):
    """What pairs.state holds. A str, so a State equals the text SQLite gives back ("done" == State.DONE)
    and binds as an SQL parameter as it is."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    # f"{State.DONE}" is 'done' on every Python: from 3.12 an Enum formats as its str().
    __str__ = str.__str__


STATES = tuple(s.value for s in State)  # in the order status shows them


@dataclass(frozen=True)
class Column:
    """A column of `pairs`: `sql` its type and constraints, `note` the comment the CREATE TABLE
    carries, `since` the schema that added it, `outcome` whether an attempt sets it (a new claim
    clears it, so a pair never shows the losses or the error of an attempt before)."""

    name: str
    sql: str
    note: str = ""
    since: int = 1
    outcome: bool = False


def column(sql: str, note: str = "", outcome: bool = False) -> Any:
    """A Row field that is a column of the first schema (see Column)."""
    return field(metadata={"column": Column("", sql, note, 1, outcome)})


_STATE_CHECK = "CHECK (state IN (" + ", ".join(f"'{s}'" for s in STATES) + "))"


@dataclass(frozen=True)
class Row:
    """A pair as the ledger holds it; one field per column, in the table's order."""

    id: int = column("INTEGER PRIMARY KEY")
    content: str = column("TEXT NOT NULL", "relative to the content folder")
    style: str = column("TEXT NOT NULL", "relative to the style folder")
    content_path: str = column("TEXT NOT NULL")
    style_path: str = column("TEXT NOT NULL")
    output: str = column("TEXT NOT NULL", "relative to the output folder")
    recipe: str = column("TEXT NOT NULL", "hash of inputs + settings that made / will make the output")
    state: str = column(f"TEXT NOT NULL {_STATE_CHECK}")  # a State's value
    attempts: int = column("INTEGER NOT NULL DEFAULT 0")
    error_kind: str | None = column("TEXT", outcome=True)
    error_message: str | None = column("TEXT", outcome=True)
    note: str | None = column("TEXT", 'e.g. "retried at 362 px after running out of memory"', outcome=True)
    worker: str | None = column("TEXT")
    heartbeat: float | None = column("REAL")
    started_at: float | None = column("REAL")
    finished_at: float | None = column("REAL")
    seconds: float | None = column("REAL", outcome=True)
    steps: int | None = column("INTEGER", outcome=True)
    content_loss: float | None = column("REAL", outcome=True)
    style_loss: float | None = column("REAL", outcome=True)
    tv_loss: float | None = column("REAL", outcome=True)
    total_loss: float | None = column("REAL", outcome=True)


ADDED = (
    # A done pair's loss curve, thinned (losslog.curve_record): the report draws it without reading
    # losses.csv. Not a Row field: 200,000 of them are read a page at a time (Reads.curves).
    Column("curve", "TEXT", since=4, outcome=True),
    # The method that made a done pair (optimize or network; NULL: made before, by optimisation). Not
    # a Row field: a schema 4 ledger, read as it is by status and report, has no such column.
    Column("method", "TEXT", since=5, outcome=True),
    # The recipe of the model (methods.model_recipe) that made a done network pair; NULL for a pair made
    # by optimisation, or by a network before schema 7. Not a Row field, for the same reason as method.
    Column("model", "TEXT", since=7, outcome=True),
)

PAIRS = tuple(replace(f.metadata["column"], name=f.name) for f in fields(Row)) + ADDED
COLUMNS = tuple(f.name for f in fields(Row))  # what a Row is read from, in order
SELECT = ", ".join(COLUMNS)
OUTCOME = tuple(c.name for c in PAIRS if c.outcome)


def row(r: sqlite3.Row) -> Row:
    """A Row from `SELECT *`, whatever columns later schemas added."""
    return Row(*(r[c] for c in COLUMNS))


def _declared(c: Column) -> str:
    """A column's line in CREATE TABLE, comments lined up as they always were."""
    return f"    {c.name:<14}{c.sql + ',':<20}-- {c.note}" if c.note else f"    {c.name:<14}{c.sql},"


_PAIRS = ("CREATE TABLE IF NOT EXISTS pairs (\n" + "".join(_declared(c) + "\n" for c in PAIRS if c.since == 1)
          + "    UNIQUE (content, style)\n)")

_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"

# A live row (fresh heartbeat, process not known dead) holds the output folder to its settings.
_WORKERS = """CREATE TABLE IF NOT EXISTS workers (
    worker     TEXT PRIMARY KEY,          -- host:pid
    settings   TEXT NOT NULL,             -- JSON of plan.recipe_settings: what makes its pixels
    lease_s    REAL NOT NULL,
    heartbeat  REAL NOT NULL,
    started_at REAL NOT NULL
)"""

# What plan.HashCache learnt: a file whose size and mtime are unchanged keeps its hash.
_FILES = """CREATE TABLE IF NOT EXISTS files (
    path     TEXT PRIMARY KEY,            -- absolute, as the plan found it
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash     TEXT NOT NULL
) WITHOUT ROWID"""

# Each style's learned network: its recipe (methods.model_recipe), how far its training got (the
# checkpoint OUT/models/<style>.pt holds that step) and its training curve.
_MODELS = """CREATE TABLE IF NOT EXISTS models (
    style      TEXT PRIMARY KEY,          -- relative to the style folder, as pairs.style
    recipe     TEXT NOT NULL,
    step       INTEGER NOT NULL,          -- training steps in the checkpoint
    steps      INTEGER NOT NULL,          -- network_steps: trained when step reaches it
    updated_at REAL NOT NULL,
    curve      TEXT                       -- losslog.curve_record of the training losses
)"""

# The tables and indexes each schema brought, besides its ADDED columns. Pairs already stored are
# kept as they are by every step: new tables, new indexes, new nullable columns (NULL for pairs made
# before). The second index of 3 serves claims of one style (filling a batch): (state, style, rowid).
_BROUGHT: dict[int, tuple[str, ...]] = {
    1: (_META, _PAIRS, "CREATE INDEX IF NOT EXISTS pairs_state ON pairs (state)"),
    2: (_WORKERS,),
    3: (_FILES, "CREATE INDEX IF NOT EXISTS pairs_state_style ON pairs (state, style)"),
    4: (),
    5: (_MODELS,),
    # The photos a model trained on: their count, and their names (a JSON list, at most network.TRAIN_PHOTOS).
    6: ("ALTER TABLE models ADD COLUMN photos INTEGER", "ALTER TABLE models ADD COLUMN trained_on TEXT"),
    7: (),
}


def statements(version: int) -> list[str]:
    """What takes a ledger of schema `version` - 1 (0: an empty file) to `version`."""
    return [f"ALTER TABLE pairs ADD COLUMN {c.name} {c.sql}" for c in ADDED if c.since == version] + \
        list(_BROUGHT[version])


def stored_version(db: sqlite3.Connection) -> int:
    """The schema_version in meta; 0 for a file without one (a new ledger)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
        return 0
    r = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(r[0]) if r else 0


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Create a new ledger or bring an older one to SCHEMA_VERSION, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = stored_version(db)
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{path} was written by a newer nst-batch (schema {version}, "
                              f"this one knows {SCHEMA_VERSION}); upgrade nst-batch")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in statements(v):
                db.execute(stmt)
        if version != SCHEMA_VERSION:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
