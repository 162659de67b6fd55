"""summary.csv (one row per pair) and the count of pairs by state that the terminal and every page show.

Text cells that a spreadsheet would run as a formula (starting with = + - @, tab or CR) get a leading '
(OWASP's advice); the ledger keeps the names as they are.
"""

from __future__ import annotations

import csv
import io
from typing import Iterable

from ..batch.ledger import STATES, Row

SUMMARY_COLUMNS = ("content", "style", "state", "attempts", "content_loss", "style_loss", "tv_loss", "total_loss",
                   "seconds", "output", "error_kind", "error_message", "method", "model")
STATE_ORDER = ("done", "failed", "running", "pending")  # as the pages list them: results first
assert set(STATE_ORDER) == set(STATES)


def count_states(rows: Iterable[Row]) -> dict[str, int]:
    """Pairs by state, every state present (0 when none): `status` and the pages count the same way."""
    c = dict.fromkeys(STATES, 0)
    for r in rows:
        c[r.state] += 1
    return c


def counts_by_style(rows: Iterable[Row]) -> dict[str, dict[str, int]]:
    """count_states of each style's pairs, in one pass (a style page shows its style's counts)."""
    by: dict[str, dict[str, int]] = {}
    for r in rows:
        c = by.get(r.style)
        if c is None:
            c = by[r.style] = dict.fromkeys(STATES, 0)
        c[r.state] += 1
    return by


def shown(r: Row, column: str, methods: dict[tuple[str, str], str] | None = None,
          models: dict[tuple[str, str], str] | None = None) -> object:
    """A ledger value as the report shows it. A pair that is not done can still hold the losses of an
    earlier, successful attempt (and a pending or running one its seconds): those are not its result.
    `methods`, `models`: Ledger.methods and Ledger.pair_models."""
    if column in ("steps", "content_loss", "style_loss", "tv_loss", "total_loss") and r.state != "done":
        return None
    if column == "seconds" and r.state not in ("done", "failed"):
        return None
    if column == "method":  # of a done pair only: what made its image (a ledger before schema 5: optimize)
        return (methods or {}).get((r.content, r.style), "optimize") if r.state == "done" else None
    if column == "model":  # the recipe of the network that made a done pair (none: optimised, or not recorded)
        return (models or {}).get((r.content, r.style)) if r.state == "done" else None
    return getattr(r, column)


# A spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...), -2+3, @SUM):
# a photo called "=cmd|' /C calc'!A0.jpg" must stay text. OWASP's advice: prefix a single quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def summary_csv(rows: list[Row], methods: dict[tuple[str, str], str] | None = None,
                models: dict[tuple[str, str], str] | None = None) -> str:
    """SUMMARY_COLUMNS of each pair, as `shown` gives them, written out column by column: this runs for
    every pair of a collection."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    methods, models = methods or {}, models or {}
    cell = csv_cell
    for r in rows:
        done = r.state == "done"
        w.writerow((cell(r.content), cell(r.style), r.state, r.attempts,
                    *((r.content_loss, r.style_loss, r.tv_loss, r.total_loss) if done else _NO_LOSSES),
                    r.seconds if done or r.state == "failed" else None, cell(r.output), cell(r.error_kind),
                    cell(r.error_message), methods.get((r.content, r.style), "optimize") if done else None,
                    models.get((r.content, r.style)) if done else None))
    return buf.getvalue()


_NO_LOSSES = (None, None, None, None)
