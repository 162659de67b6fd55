"""report.html, the front page: the pictures first, then what went wrong, then the rest folded away.

A small run (up to FRONT_GRID_MAX_PAIRS pairs) opens on its results as a grid, photos × styles, each
output linked to the full image. A larger one opens on a sample per style (its first FRONT_SAMPLE
outputs, each linked to its card) with the style's counts and pages. Then every failure with its
reason (the first FRONT_LIST_MAX; summary.csv has them all) and how to retry them, skipped inputs, and
the settings inside a <details>. No part of it grows with the number of photos beyond those caps.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from ..batch.ledger import Row
from ..files.layout import CONTACT_SHEET, PREVIEWS, SUMMARY_CSV
from ..files.names import printable, skipped_line
from . import pages
from .grid import Grid
from .pages import href, num, opt_href, page_path
from .sheets import SHEET_MAX_SIDE, SHEET_STYLE_MAX, Sheets
from .status import Summary, duration, method_line, retry_commands
from .summary import STATE_ORDER
from .thumbs import Thumbs

FRONT_GRID_MAX_PAIRS = 100  # up to this many pairs the front page shows them all, photos × styles
FRONT_SAMPLE = 8  # outputs per style on a larger run's front page
FRONT_LIST_MAX = 1000  # failures and skipped inputs listed on the front page (summary.csv has them all)
OPEN_SECTIONS_UP_TO = 100  # skipped inputs: more than this and their list starts closed


def front_context(out: Path, grid: Grid, settings: dict, s: Summary, thumbs: Thumbs, n_pages: int,
                  sheets: Sheets, counts: dict[str, dict[str, int]]) -> dict:
    """Everything front.html shows. `n_pages`: the pages each style has (every style has as many);
    `counts`: summary.counts_by_style."""
    stats = _style_stats(grid, counts)
    styles = [{"k": k, "name": style, "thumb": opt_href(thumbs.style.get(style)), **stats[style],
               "pages": [(n, href(page_path(k, n))) for n in range(1, n_pages + 1)],
               "sheet": href(sheets.per_style[k]) if k in sheets.per_style else None}
              for k, style in enumerate(grid.styles, 1)]
    small = len(grid.cells) <= FRONT_GRID_MAX_PAIRS
    layout = sheets.layout
    return {
        "title": f"nst-batch report: {out.resolve().name}", "out": str(out.resolve()),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "summary_csv": SUMMARY_CSV,
        "contact_sheet": CONTACT_SHEET, "s": s, "c": s.counts, "states": STATE_ORDER,
        "n_contents": len(grid.contents), "n_styles": len(grid.styles),
        "compute": duration(s.seconds_total), "mean": f"{s.seconds_mean:.1f} s" if s.seconds_mean else "-",
        "rate": f"{s.pairs_per_hour:.1f}" if s.pairs_per_hour else "-", "eta": duration(s.eta_s),
        "refresh": f"nst-batch report {shlex.quote(str(out))}",
        "sheet_partial": (layout.contents, layout.styles) != (len(grid.contents), len(grid.styles)),
        "layout": layout, "sheet_max": SHEET_MAX_SIDE, "per_style_sheets": bool(sheets.per_style),
        "sheet_style_max": SHEET_STYLE_MAX, "page_rows": pages.PAGE_ROWS, "styles": styles,
        "grid": _result_grid(grid, thumbs) if small else None,
        "samples": None if small else {k: _sample(grid, thumbs, k, style) for k, style in enumerate(grid.styles, 1)},
        "sample_n": FRONT_SAMPLE, **_failures(out, grid, s), **_skipped(s),
        "settings": [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in settings.items()],
        "previews": f"{PREVIEWS}/index.html" if (out / PREVIEWS / "index.html").is_file() else None,
        "methods": method_line(s.method_counts),
    }


def _style_stats(grid: Grid, counts: dict[str, dict[str, int]]) -> dict[str, dict]:
    """Per style: its counts by state, mean seconds and mean final total loss of its done pairs. One
    pass over the pairs, not one per style."""
    acc = {style: [counts[style], 0.0, 0, 0.0, 0] for style in grid.styles}
    for r in grid.cells.values():
        a = acc[r.style]
        if r.state == "done":
            if r.seconds is not None:
                a[1] += r.seconds
                a[2] += 1
            if r.total_loss is not None:
                a[3] += r.total_loss
                a[4] += 1
    return {style: {"counts": c, "seconds": num(secs / n_secs if n_secs else None, "{:.1f}"),
                    "total": num(loss / n_loss if n_loss else None)}
            for style, (c, secs, n_secs, loss, n_loss) in acc.items()}


def _cell(grid: Grid, thumbs: Thumbs, r: Row | None, k: int, position: int) -> dict | None:
    """One pair as the front page shows it: the picture linked to the full image, or why there is none."""
    if r is None:
        return None
    on_disk = r.id in grid.on_disk
    msg = r.error_message or ""
    return {"state": r.state, "name": f"{r.style} × {r.content}", "card": pages.card_href(k, position, r.id),
            "href": href(r.output) if on_disk else None, "thumb": opt_href(thumbs.output.get(r.id)) if on_disk else None,
            "kind": r.error_kind or "failed", "message": msg, "short": msg if len(msg) <= 90 else msg[:87] + "…"}


def _result_grid(grid: Grid, thumbs: Thumbs) -> list[dict]:
    """Every pair, a row per photo and a column per style (a small run)."""
    return [{"name": content, "thumb": thumbs.content.get(content),
             "cells": [_cell(grid, thumbs, grid.cells.get((content, style)), k, i)
                       for k, style in enumerate(grid.styles, 1)]}
            for i, content in enumerate(grid.contents)]


def _sample(grid: Grid, thumbs: Thumbs, k: int, style: str) -> list[dict]:
    """A style's first FRONT_SAMPLE outputs that have a picture to show, in plan order (a large run)."""
    got = []
    for i, content in enumerate(grid.contents):
        r = grid.cells.get((content, style))
        if r is not None and r.id in grid.on_disk and r.id in thumbs.output:
            got.append({"name": f"{style} × {content}", "thumb": href(thumbs.output[r.id]),
                        "card": pages.card_href(k, i, r.id)})
            if len(got) == FRONT_SAMPLE:
                break
    return got


def _failures(out: Path, grid: Grid, s: Summary) -> dict:
    pos = {c: i for i, c in enumerate(grid.contents)}
    k_of = {style: k for k, style in enumerate(grid.styles, 1)}
    kinds: dict[str, int] = {}
    for f in s.failures:
        kinds[f["kind"] or ""] = kinds.get(f["kind"] or "", 0) + 1
    listed = [{**f, "page": pages.card_href(k_of[f["style"]], pos[f["content"]],
                                            grid.cells[(f["content"], f["style"])].id)}
              for f in s.failures[:FRONT_LIST_MAX]]
    return {"failures": listed, "kinds": sorted(kinds.items()),
            "retry": retry_commands(out, s.failures) if s.failures else [], "list_max": FRONT_LIST_MAX}


def _skipped(s: Summary) -> dict:
    return {"skipped_line": skipped_line(s.skipped) if s.skipped else "",
            "skipped": [{"key": k.key, "path": printable(k.path), "why": k.why} for k in s.skipped[:FRONT_LIST_MAX]],
            "skipped_open": len(s.skipped) <= OPEN_SECTIONS_UP_TO}
