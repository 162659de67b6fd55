"""What `status`, the report, `auto` and the run read: aggregates where they can (200,000 pairs are
counted in SQL, not loaded), rows where they must. A ledger opened read-only is read as it is, so
each reader of a column a later schema added answers for a ledger without it too."""

from __future__ import annotations

import sqlite3
from typing import Iterable

from .connection import Connection
from .schema import SELECT, STATES, Row, State, row

_DONE = f"state='{State.DONE}'"


class Reads(Connection):
    def get(self, pair_id: int) -> Row:
        return row(self.db.execute("SELECT * FROM pairs WHERE id=?", (pair_id,)).fetchone())

    def rows(self) -> list[Row]:
        return [Row(*r) for r in self.db.execute(f"SELECT {SELECT} FROM pairs ORDER BY id")]

    def failed_rows(self) -> list[Row]:
        return [row(r) for r in self.db.execute(f"SELECT * FROM pairs WHERE state='{State.FAILED}' ORDER BY id")]

    def outputs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT output FROM pairs")]

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATES, 0)
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM pairs GROUP BY state"):
            c[state] = n
        return c

    def done_seconds(self) -> tuple[list[float], float | None, float | None]:
        """For the summary, without loading rows: compute seconds of each done pair (by id), the
        first start and the last finish among them."""
        secs = [r[0] for r in self.db.execute(
            f"SELECT seconds FROM pairs WHERE {_DONE} AND seconds IS NOT NULL ORDER BY id")]
        first, last = self.db.execute("SELECT MIN(started_at), MAX(finished_at) FROM pairs "
                                      f"WHERE {_DONE} AND seconds IS NOT NULL").fetchone()
        return secs, first, last

    def top_done(self, column: str, n: int) -> list[Row]:
        """The n done pairs with the highest `column` (ties: lowest id first)."""
        if column not in ("seconds", "total_loss"):
            raise ValueError(column)
        return [row(r) for r in self.db.execute(
            f"SELECT * FROM pairs WHERE {_DONE} AND {column} IS NOT NULL ORDER BY {column} DESC, id LIMIT ?", (n,))]

    def curves(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> stored curve (JSON text) of those pairs that have one. Looked up by id, a page's
        pairs at a time, so the report never holds 200,000 curves. Empty for a ledger from before
        schema 4."""
        if not self._has("curve"):
            return {}
        ids = list(ids)
        got: dict[int, str] = {}
        for i in range(0, len(ids), 500):  # well under SQLite's limit on bound parameters
            chunk = ids[i:i + 500]
            got.update(self.db.execute(f"SELECT id, curve FROM pairs WHERE curve IS NOT NULL AND id IN "
                                       f"({','.join('?' * len(chunk))})", chunk).fetchall())
        return got

    def done_recipes(self) -> dict[tuple[str, str], str]:
        """(content, style) -> recipe of every done pair: what `auto` counts pending photos against."""
        return {(r[0], r[1]): r[2] for r in self.db.execute(f"SELECT content, style, recipe FROM pairs WHERE {_DONE}")}

    def methods(self) -> dict[tuple[str, str], str]:
        """(content, style) -> the method that made each done pair ('optimize' for pairs made before the
        column existed; a schema 4 ledger has no column: all 'optimize')."""
        try:
            rows = self.db.execute(f"SELECT content, style, COALESCE(method, 'optimize') FROM pairs WHERE {_DONE}")
            return {(r[0], r[1]): r[2] for r in rows}
        except sqlite3.OperationalError:
            rows = self.db.execute(f"SELECT content, style FROM pairs WHERE {_DONE}")
            return {(r[0], r[1]): "optimize" for r in rows}

    def method_counts(self) -> dict[str, int]:
        """Done pairs per method, for status."""
        try:
            rows = self.db.execute(f"SELECT COALESCE(method, 'optimize'), COUNT(*) FROM pairs WHERE {_DONE} GROUP BY 1")
            return {r[0]: r[1] for r in rows}
        except sqlite3.OperationalError:
            n = self.db.execute(f"SELECT COUNT(*) FROM pairs WHERE {_DONE}").fetchone()[0]
            return {"optimize": n} if n else {}

    def _has(self, column: str) -> bool:
        """Whether pairs has `column`: a ledger opened read-only is read as the schema that wrote it."""
        return column in {r[1] for r in self.db.execute("PRAGMA table_info(pairs)")}

    def pair_models(self) -> dict[tuple[str, str], str]:
        """(content, style) -> the recipe of the model that made each done network pair (those made before
        schema 7 recorded none and are not in it)."""
        if not self._has("model"):
            return {}
        rows = self.db.execute(f"SELECT content, style, model FROM pairs WHERE {_DONE} AND model IS NOT NULL")
        return {(r[0], r[1]): r[2] for r in rows}

    def made_counts(self) -> dict[tuple[str, str, str | None], int]:
        """(style, method, model) -> how many done pairs: per style, what each method made and, for a
        network, which model (None: not recorded, made before schema 7). One grouped query, for status."""
        method = "COALESCE(method, 'optimize')" if self._has("method") else "'optimize'"
        model = "model" if self._has("model") else "NULL"
        rows = self.db.execute(f"SELECT style, {method}, {model}, COUNT(*) FROM pairs WHERE {_DONE} GROUP BY 1, 2, 3")
        return {(r[0], r[1], r[2]): r[3] for r in rows}

    def network_made(self) -> dict[str, int]:
        """style -> its done pairs a network made (what `retrain` would make again)."""
        rows = self.db.execute(f"SELECT style, COUNT(*) FROM pairs WHERE {_DONE} AND method='network' "
                               "GROUP BY style").fetchall()
        return {r[0]: r[1] for r in rows}

    def models(self) -> dict[str, dict]:
        """style -> {recipe, step, steps, updated_at, curve, photos, trained_on} ({} for a ledger older than
        schema 5; photos and trained_on absent before schema 6)."""
        try:
            cur = self.db.execute("SELECT * FROM models")
        except sqlite3.OperationalError:
            return {}
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names[1:], r[1:])) for r in cur.fetchall()}
