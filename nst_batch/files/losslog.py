"""OUT/losses.csv, the loss log: its format written (`LossLog`, by the drive) and read
(`read_curves`, by the report) in this one file.

One line per logged optimisation step: LOSS_COLUMNS. `step` counts over all scales, `px` is the long
side at that step's scale, `attempt` the ledger's attempt number that made it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol


LOSS_LOG = "losses.csv"
LOSS_COLUMNS = ("content", "style", "step", "content_loss", "style_loss", "tv_loss", "total_loss", "elapsed_s",
                "attempt", "px")


class Named(Protocol):
    content: str
    style: str


class Attempt(Protocol):
    """A pair as the ledger knows it (a ledger Row): which attempt is its current one, and its state."""
    content: str
    style: str
    attempts: int
    state: str


class LogRow(Protocol):
    """What a row is made of (optimize.LogRow; not imported: the reader must not load torch)."""
    step: int
    px: int
    content: float
    style: float
    tv: float
    total: float
    elapsed_s: float


class LossLog:
    """OUT/losses.csv, appended a whole line per write() on an O_APPEND file: rows from several
    workers never interleave mid-line, and a killed run keeps every row it wrote."""

    HEADER = (",".join(LOSS_COLUMNS) + "\n").encode()

    def __init__(self, out: Path):
        self.path = out / LOSS_LOG
        # No temporary file and no link (FAT and exFAT have no hard links). The header is the only thing
        # ever written in the file's first len(HEADER) bytes, and no row is appended before they are
        # there: whoever finds the file shorter than that (the worker that created it, one that opened
        # it a moment after, or a run after a creator killed in between) writes the same header at
        # offset 0 itself first. Several doing so at once write the same bytes to the same place.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another worker, or an earlier run, got there first
            fd = os.open(self.path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size < len(self.HEADER):
                os.write(fd, self.HEADER)  # at offset 0: this descriptor is ours alone and not O_APPEND
        finally:
            os.close(fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, pair: Named, attempt: int, logs: Iterable[LogRow]) -> None:
        """One line per log row; `pair` names the pair (.content, .style: a ledger Row or an engine Job)."""
        def q(s: str) -> str:
            return '"' + s.replace('"', '""') + '"' if any(ch in s for ch in ',"\n') else s

        lines = "".join(
            f"{q(pair.content)},{q(pair.style)},{r.step},{r.content:.6g},{r.style:.6g},{r.tv:.6g},{r.total:.6g},"
            f"{r.elapsed_s:.3f},{attempt},{r.px}\n" for r in logs)
        os.write(self.fd, lines.encode())

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Point:
    step: int
    px: int
    content: float
    style: float
    total: float


def read_curves(path: Path, rows: list[Attempt]) -> dict[tuple[str, str], list[Point]]:
    """Per (content, style): the loss-log rows of the ledger's current attempt, in step order.

    Rows of earlier, abandoned attempts are skipped, and so are those of a pending pair (its last
    attempt was interrupted or is to be redone). Within one attempt a batch that ran out of
    memory is made again one pair at a time, from step 1: only that last start is kept. The final row
    repeats the last step with the losses of the image as written: it replaces that step.
    """
    want = {(r.content, r.style): r.attempts for r in rows if r.attempts and r.state != "pending"}
    logged: dict[tuple[str, str], list[Point]] = {}
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        return {}
    with f:
        reader = csv.reader(f)
        col = {name: i for i, name in enumerate(next(reader, []))}
        try:
            ic, is_, ia, istep, ipx = (col[k] for k in ("content", "style", "attempt", "step", "px"))
            il = [col[k] for k in ("content_loss", "style_loss", "total_loss")]
        except KeyError:
            return {}
        for rec in reader:
            try:
                key = (rec[ic], rec[is_])
                if want.get(key) != int(rec[ia]):
                    continue
                logged.setdefault(key, []).append(Point(int(rec[istep]), int(rec[ipx]), *(float(rec[i]) for i in il)))
            except (IndexError, ValueError):  # a line cut short by a crash
                continue
    return {key: pts for key, rows_ in logged.items() if (pts := curve_points(rows_))}


def curve_points(rows: Iterable) -> list[Point]:
    """One attempt's logged rows (anything with step, px, content, style and total: optimize.LogRow or a
    Point read back), in the order logged, to its curve: an out-of-memory retry starts again from step 1
    (only that last start is kept), the final row repeats the last step with the losses of the image as
    written (it replaces that step), and a non-finite value is not drawn."""
    series: list[Point] = []
    for r in rows:
        p = Point(int(r.step), int(r.px), float(r.content), float(r.style), float(r.total))
        if not all(map(math.isfinite, (p.content, p.style, p.total))):
            continue
        if series and p.step < series[-1].step:
            series.clear()
        elif series and p.step == series[-1].step:
            series.pop()
        series.append(p)
    return series


def thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


# A pair's stored and drawn curve (under 1 KB in the ledger), whatever log_every was: 6 px apart on the
# report's 180 px wide plot.
CURVE_MAX_POINTS = 30


def curve_record(rows: Iterable) -> str | None:
    """The compact curve the ledger stores with a done pair (Ledger.done(curve=...)): a JSON list of at
    most CURVE_MAX_POINTS [step, px, content, style, total], losses to 4 significant digits (a chart
    84 px high needs no more); None when nothing was logged. So the report draws 200,000 curves
    without reading losses.csv."""
    pts = thin(curve_points(rows), CURVE_MAX_POINTS)
    if not pts:
        return None
    return "[" + ",".join(f"[{p.step},{p.px},{p.content:.4g},{p.style:.4g},{p.total:.4g}]" for p in pts) + "]"


def parse_curve(text: str | None) -> list:
    """curve_record's text back to [step, px, content, style, total] lists; [] for anything else (a
    damaged value draws nothing). Lists, not Points: 200,000 curves."""
    try:
        pts = json.loads(text or "[]")
        return pts if isinstance(pts, list) and all(isinstance(p, list) and len(p) == 5 for p in pts) else []
    except (TypeError, ValueError):
        return []
