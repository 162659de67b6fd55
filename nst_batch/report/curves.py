"""Loss curves for the style pages: where they come from, and the small SVG charts drawn from them.

Loss curves come from the ledger (losslog.curve_record, stored with each done pair); losses.csv is read
only for pairs without one, and only when it is under CURVE_CSV_MAX_BYTES.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup

from ..batch.ledger import LedgerSet, Row
from ..files.losslog import CURVE_MAX_POINTS, Point, parse_curve, read_curves, thin

CURVE_CSV_MAX_BYTES = 50_000_000  # losses.csv read for curves the ledger lacks only up to this size
SERIES = ("content", "style", "total")  # their colours: templates/report.css
_W, _H, _L, _B = 220, 84, 38, 14  # chart size, left and bottom margins (templates/style.html draws with them)


class Curves:
    """Each pair's curve for the pages: the ledger's stored one, looked up a page at a time; for a pair
    without one (a run from before schema 4, a failed or running pair) losses.csv, read once and only
    when it is under CURVE_CSV_MAX_BYTES (at 200,000 pairs it holds millions of rows)."""

    def __init__(self, ledger: LedgerSet, log: Path, rows: list[Row]):
        self.ledger, self.log, self.rows = ledger, log, rows
        self._csv: dict[tuple[str, str], list[Point]] | None = None
        self._small: bool | None = None

    def stored(self, rows: list[Row]) -> dict[int, str]:
        return self.ledger.curves(r.id for r in rows)

    def _lacking(self, rows: list[Row], stored: dict[int, str]) -> bool:
        return any(r.id not in stored and r.attempts and r.state != "pending" for r in rows)

    def _log_signature(self) -> tuple | None:
        """losses.csv's (size, mtime) when it is there and small enough to read, else None."""
        try:
            st = self.log.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if st.st_size < CURVE_CSV_MAX_BYTES else None

    def csv_signature(self, rows: list[Row], stored: dict[int, str]) -> tuple | None:
        """What the curves of these pairs read from losses.csv depend on: None when they read nothing."""
        return self._log_signature() if self._lacking(rows, stored) else None

    def of(self, rows: list[Row], stored: dict[int, str]) -> dict[int, list]:
        got = {i: parse_curve(text) for i, text in stored.items()}
        if self._lacking(rows, stored):
            fallback = self._from_csv()
            got |= {r.id: [(p.step, p.px, p.content, p.style, p.total) for p in fallback[(r.content, r.style)]]
                    for r in rows if r.id not in got and (r.content, r.style) in fallback}
        return got

    def _from_csv(self) -> dict[tuple[str, str], list[Point]]:
        if self._csv is None:
            self._csv = read_curves(self.log, self.rows) if self._log_signature() is not None else {}
        return self._csv


@dataclass(frozen=True)
class Chart:
    """A small chart of content, style and total loss over steps (drawn by the templates as SVG):
    numbers and fixed words only, no user data. Log y when the values span 10× or more."""
    scales: list[tuple[int, int]]  # (x, px) where a new scale starts
    series: list[tuple[str, str]]  # (name, "x,y x,y ...")
    top: str  # y labels
    bottom: str
    first_step: str
    last_step: str  # "150 steps", "150 steps · log"


def chart(points: list) -> Chart | None:
    """loss_chart, or None for a damaged stored curve: no chart, not a crash."""
    try:
        return loss_chart(points)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def chart_svg(points: list) -> Markup | None:
    """A pair's chart as its card draws it (templates/macros.html's `chart`, the same markup), built
    here with one format instead of by the template, for each of 200,000 cards. Marked safe because it
    holds no text from outside: every value goes through %d or a float format, so a damaged stored curve
    raises (no chart) instead of reaching the page."""
    try:
        g = loss_chart(points)
        if g is None:
            return None
        scales = "".join(_SCALE % (x, x + 2, px) for x, px in g.scales)
        series = "".join(_LINE % (points, name) for name, points in g.series)
        return Markup(_SVG % (scales, series, g.top, g.bottom, g.first_step, g.last_step))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


_SCALE = '<path d="M%d 4V70" class="scale"/><text x="%d" y="12" class="lbl">%dpx</text>'
_LINE = '<polyline points="%s" class="%s"/>'
_SVG = ('<svg class="curve" viewBox="0 0 220 84" role="img" aria-label="loss over steps">'
        '<path d="M38 4V70H220" class="axis"/>\n%s\n%s\n<text x="35" y="10" class="lbl r">%s</text>'
        '<text x="35" y="70" class="lbl r">%s</text><text x="38" y="82" class="lbl">%s</text>'
        '<text x="218" y="82" class="lbl r">%s</text></svg>')


def loss_chart(points: list) -> Chart | None:
    """Points: (step, px, content, style, total). None when there is nothing to draw (no points, or no
    positive loss). Plain arithmetic on columns, x positions shared by the pairs logged at the same
    steps: it runs for each of 200,000 pairs."""
    pts = thin(points, CURVE_MAX_POINTS)
    if not pts:
        return None
    steps, pxs, *cols = zip(*pts)
    positive = [v for col in cols for v in col if v > 0]
    if not positive:
        return None
    lo, hi = min(positive), max(positive)
    log = hi / lo >= 10
    if log:
        log10 = math.log10
        cols = [list(map(log10, map(max, col, itertools.repeat(lo)))) for col in cols]
        ylo, yhi = log10(lo), log10(hi)
    else:
        ylo, yhi = min(0.0, *cols[0], *cols[1], *cols[2]), hi
    ky = (_H - _B - 8) / ((yhi - ylo) or 1)
    top = 4.5 + yhi * ky  # y = 4 + (yhi - v) * ky, rounded to whole pixels (a smaller page)
    n = len(pts)
    xy = [0] * (2 * n)
    xy[::2] = _xs(steps)
    fmt = _xy_format(n)
    series = []
    for name, col in zip(SERIES, cols):
        xy[1::2] = [int(top - v * ky) for v in col]
        series.append((name, fmt % tuple(xy)))  # one C-level format for the whole polyline
    s0 = steps[0]
    kx = (_W - _L - 4) / ((steps[-1] - s0) or 1)
    scales = [(round(_L + (steps[i] - s0) * kx), pxs[i]) for i in range(1, n) if pxs[i] != pxs[i - 1]]
    return Chart(scales, series, f"{hi:.3g}", f"{lo if log else ylo:.3g}", "%d" % s0,
                 f"{'%d' % steps[-1]} steps{' · log' if log else ''}")  # numbers only: see chart_svg


@functools.lru_cache(maxsize=None)
def _xy_format(n: int) -> str:
    return " ".join(["%d,%d"] * n)


@functools.lru_cache(maxsize=256)
def _xs(steps: tuple) -> list[int]:
    """x of each step, whole pixels (a smaller page): the same for every pair logged at these steps."""
    s0 = steps[0]
    kx = (_W - _L - 4) / ((steps[-1] - s0) or 1)
    return [int(_L + 0.5 + (st - s0) * kx) for st in steps]
