"""What a run made and what went wrong, read from the ledger while workers may still be going.

(The terminal view is `status`.) `write_report` writes the files a person opens later, all inside OUT and linked by relative paths only, so they keep
working once OUT is zipped and moved. Sized for whole collections (200,000 pairs): no page grows
with the collection, and nothing is decoded or read again that the run already recorded.

- report.html: the front page: counts, rates, failures and how to retry them, skipped inputs,
  one line per style (counts, mean seconds and loss, links to its pages), settings.
- styles/<k>.html, styles/<k>-<n>.html: style k's pairs, PAGE_ROWS photos a page, as a grid
  of cards that fills the window's width: the output (240 px thumbnail, lazily loaded, linked
  to the full image), the photo, final losses, seconds, loss curve (inline SVG), or the error.
  No network, no script. Pages come from nst_batch/templates (Jinja2, autoescaping on).
- summary.csv: one row per pair. Text cells that a spreadsheet would run as a formula
  (starting with = + - @, tab or CR) get a leading ' (OWASP's advice); the ledger keeps the names as they are.
- contact_sheet.jpg: the grid as one picture. Cells are 180 px; when (contents + 1) or
  (styles + 1) cells would pass 8000 px, cells shrink to fit, down to 64 px; past that
  (more than 124 contents or styles) the sheet holds the first 124. When it cannot hold every
  pair with cells of SHEET_LABEL_PX or more (past 82 photos or styles), each style also gets
  contact_sheets/<k>-<name>.jpg: its first SHEET_STYLE_MAX outputs, SHEET_STYLE_COLUMNS a row, 120 px.
- thumbs/: 240 px JPEGs of every output and source image. The runner writes an output's own
  from the image in memory (encode.write_thumbnail); the report makes any that is missing or older
  than its image (older runs), so re-running the report on a big run is quick.
- Loss curves come from the ledger (losslog.curve_record, stored with each done pair); losses.csv is read
  only for pairs without one, and only when it is under CURVE_CSV_MAX_BYTES.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..files.layout import CONTACT_SHEET, REPORT_HTML, SHEETS, STYLES, SUMMARY_CSV, THUMBS, thumb_path, write_atomic, write_text_atomic
from ..files.layout import PREVIEWS
from ..batch.ledger import LedgerSet, Row, open_ledgers, output_exists
from ..files.encode import THUMB_PX, shrink
from ..files.losslog import CURVE_MAX_POINTS, LOSS_LOG, Point, parse_curve, read_curves, thin
from .status import Summary, _dur, method_line, retry_commands, summarize
from ..config.manifest import Settings
from ..files.names import Skipped, printable, skipped_from, skipped_line

SUMMARY_COLUMNS = ("content", "style", "state", "attempts", "content_loss", "style_loss", "tv_loss", "total_loss",
                   "seconds", "output", "error_kind", "error_message", "method")


MAX_MEGAPIXELS = Settings.max_megapixels  # the manifest's default, for a ledger that stored no settings
SHEET_CELL_PX = 180
SHEET_MIN_CELL_PX = 64
SHEET_MAX_SIDE = 8000
SHEET_LABEL_PX = 96  # cells from this size up carry their names
SHEET_STYLE_COLUMNS = 20
SHEET_STYLE_MAX = 200  # photos on a style's own sheet: 20 × 10 cells (the style's pages have them all)
SHEET_STYLE_CELL_PX = 120  # half a thumbnail: JPEG decodes it at half scale, so a sheet is quick to draw
PAGE_ROWS = 500  # photos on a style's page: about 1.5 MB of HTML with their curves
FRONT_LIST_MAX = 1000  # failures and skipped inputs listed on the front page (summary.csv has them all)
CURVE_CSV_MAX_BYTES = 50_000_000  # losses.csv read for curves the ledger lacks only up to this size
OPEN_SECTIONS_UP_TO = 100  # pairs: in bigger runs the per-style sections start closed, so the page opens fast


# -- terminal -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Read:
    rows: list[Row]
    settings: dict
    skipped: list[Skipped]
    methods: dict[tuple[str, str], str]  # (content, style) -> the method that made each done pair
    models: dict[str, dict]  # style -> its network (Ledger.models: step, steps, curve)


def _read_ledger(out: Path) -> _Read:
    with open_ledgers(out) as ledgers:  # one ledger, or every shard's (issue 11)
        return _Read(ledgers.rows(), ledgers.stored_settings(), skipped_from(ledgers.get_meta("skipped")),
                     ledgers.methods(), ledgers.models())


# -- files ------------------------------------------------------------------------------------------

def write_report(out: Path) -> list[Path]:
    """Write into OUT: report.html (the front page), styles/*.html (a style's pairs, PAGE_ROWS photos
    a page), summary.csv, contact_sheet.jpg (and contact_sheets/*.jpg when one sheet cannot show the
    run readably), thumbs/. Returns report.html first, then the rest."""
    read = _read_ledger(out)
    rows, settings, skipped = read.rows, read.settings, read.skipped
    limit = settings.get("max_megapixels")
    thumbs = make_thumbnails(out, rows, limit if isinstance(limit, (int, float)) else MAX_MEGAPIXELS)
    grid = _Grid.of(out, rows)
    layout = sheet_layout(len(grid.contents), len(grid.styles))
    per_style = not layout_is_readable(layout, len(grid.contents), len(grid.styles))
    pages = style_pages(grid)
    written = [out / SUMMARY_CSV, out / CONTACT_SHEET]
    write_text_atomic(written[0], summary_csv(rows, read.methods))
    cells = [(c, s) for c in grid.contents[:layout.contents] for s in grid.styles[:layout.styles]]
    shown_c, shown_s = grid.contents[:layout.contents], grid.styles[:layout.styles]
    headers = [thumbs.content.get(c) for c in shown_c] + [thumbs.style.get(s) for s in shown_s]
    _sheet_unless_same(written[1], _sheet_key(out, grid, thumbs, cells, (layout, shown_c, shown_s), headers),
                       lambda: _contact_sheet(out, grid, thumbs, layout))
    sheets = {k: f"{SHEETS}/{k}-{_slug(style)}.jpg" for k, style in enumerate(grid.styles, 1)} if per_style else {}
    shape = style_sheet_shape(len(grid.contents))
    for k, rel in sheets.items():
        style = grid.styles[k - 1]
        cells = [(c, style) for c in grid.contents[:shape[0] * shape[1]]]
        key = _sheet_key(out, grid, thumbs, cells, (SHEET_STYLE_CELL_PX, shape, style), [thumbs.style.get(style)])
        _sheet_unless_same(out / rel, key, lambda: _style_sheet(out, grid, style, thumbs))
        written.append(out / rel)
    written += _write_pages(_PageJob(out, grid, thumbs, pages, sheets, rows, out / LOSS_LOG, read.methods, read.models),
                            range(len(pages)))
    _remove_stale(out, {p.relative_to(out).as_posix() for p in written})
    front = out / REPORT_HTML
    write_text_atomic(front, _render("front.html", **_front_context(out, grid, settings, summarize(rows, skipped, read.methods),
                                                                     thumbs, pages, layout, sheets)))
    return [front, *written]


@dataclass(frozen=True)
class _PageJob:
    out: Path
    grid: _Grid
    thumbs: Thumbs
    pages: list[StylePage]
    sheets: dict[int, str]
    rows: list[Row]
    log: Path
    methods: dict[tuple[str, str], str]
    models: dict[str, dict]


def _write_pages(job: _PageJob, which: Iterable[int]) -> list[Path]:
    """Each page unless the page there already shows the same pairs the same way (its key, in a comment
    at its top): a report run again over a finished collection rewrites only what changed."""
    ledger = open_ledgers(job.out)
    try:
        curves = _Curves(ledger, job.log, job.rows)
        written = []
        for i in which:
            page = job.pages[i]
            rows = [r for c in page.contents if (r := job.grid.cells.get((c, page.style))) is not None]
            stored = curves.stored(rows)
            key = _page_key(job, page, rows, stored, curves.csv_signature(rows, stored))
            path = job.out / page.path
            if _key_of(path) != key:
                write_text_atomic(path, _render("style.html", key=key, **_style_context(
                    job.out, job.grid, job.thumbs, page, job.pages, rows, curves.of(rows, stored), job.sheets,
                    job.methods, job.models.get(page.style))))
            written.append(path)
        return written
    finally:
        ledger.close()


@functools.lru_cache(maxsize=1)
def _code_key() -> bytes:
    """The templates and this module as they are: a page written by other code is written again."""
    h = hashlib.sha1(Path(__file__).read_bytes())
    for t in sorted((Path(__file__).parent / "templates").iterdir()):
        h.update(t.name.encode() + t.read_bytes())
    return h.digest()


def _page_key(job: _PageJob, page: StylePage, rows: list[Row], stored: dict[int, str],
              csv_signature: tuple | None) -> str:
    g, t = job.grid, job.thumbs
    h = hashlib.sha1(_code_key())
    h.update(repr((page, len(g.styles), len(g.contents), job.out.resolve().name, job.sheets.get(page.k),
                   t.style.get(page.style), csv_signature, job.models.get(page.style))).encode())
    for r in rows:
        h.update(repr((tuple(vars(r).values()), r.id in g.on_disk, t.output.get(r.id), t.content.get(r.content),
                       stored.get(r.id))).encode())
    return h.hexdigest()


_KEY = re.compile(rb"<!-- nst-batch page ([0-9a-f]{40}) -->")


def _key_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            m = _KEY.search(f.read(200))
    except OSError:
        return None
    return m.group(1).decode() if m else None


def _remove_stale(out: Path, written: set[str]) -> None:
    """Pages and sheets of an earlier report that this one did not write (fewer styles or photos now):
    left there, they would show pairs as they were."""
    for folder, ext in ((STYLES, ".html"), (SHEETS, ".jpg")):
        try:
            entries = list(os.scandir(out / folder))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name.endswith(ext) and not e.name.startswith(".") and f"{folder}/{e.name}" not in written:
                Path(e.path).unlink(missing_ok=True)


def shown(r: Row, column: str, methods: dict[tuple[str, str], str] | None = None) -> object:
    """A ledger value as the report shows it. A pair that is not done can still hold the losses of an
    earlier, successful attempt (and a pending or running one its seconds): those are not its result."""
    if column in ("steps", "content_loss", "style_loss", "tv_loss", "total_loss") and r.state != "done":
        return None
    if column == "seconds" and r.state not in ("done", "failed"):
        return None
    if column == "method":  # of a done pair only: what made its image (a ledger before schema 5: optimize)
        return (methods or {}).get((r.content, r.style), "optimize") if r.state == "done" else None
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


def summary_csv(rows: list[Row], methods: dict[tuple[str, str], str] | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for r in rows:
        w.writerow([csv_cell(shown(r, c, methods)) for c in SUMMARY_COLUMNS])
    return buf.getvalue()



@dataclass(frozen=True)
class _Grid:
    """Rows = content images, columns = style images, in plan order."""
    contents: list[str]
    styles: list[str]
    cells: dict[tuple[str, str], Row]
    on_disk: set[int]  # ids of done pairs whose output file is there to link to

    @staticmethod
    def of(out: Path, rows: list[Row]) -> _Grid:
        exists = output_exists(out)  # one listing per output folder, not one stat per pair
        return _Grid(list(dict.fromkeys(r.content for r in rows)), list(dict.fromkeys(r.style for r in rows)),
                     {(r.content, r.style): r for r in rows},
                     {r.id for r in rows if r.state == "done" and exists(r.output)})


# -- thumbnails -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thumbs:
    """Thumbnail paths relative to OUT; a missing key means no preview (no output yet, or undecodable)."""
    content: dict[str, str]
    style: dict[str, str]
    output: dict[int, str]  # by ledger row id


def _fresh(src: Path, dst: Path) -> bool | None:
    """True: dst is there and not older than src; False: it is to be made; None: no src."""
    try:
        src_mtime = src.stat().st_mtime
    except OSError:
        return None
    try:
        return dst.stat().st_mtime >= src_mtime
    except FileNotFoundError:
        return False


def _thumbnail(src: Path, dst: Path, max_pixels: float = float("inf")) -> bool:
    """Make dst from src unless it is already newer; False when src is missing, cannot be decoded, or has
    more than `max_pixels` (read from the header: such an image is never decoded)."""
    fresh = _fresh(src, dst)
    if fresh is not None:
        return fresh or _make_thumbnail(src, dst, max_pixels)
    return False


def _make_thumbnail(src: Path, dst: Path, max_pixels: float) -> bool:
    from ..files.decode import heif_support

    heif_support()  # HEIC sources get a preview too, when the run could read them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is the one below
            with Image.open(src) as im:  # reads the header only
                if im.width * im.height > max_pixels:
                    return False
                im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a fraction of full size, much faster
                rgb = shrink(im)
    except Exception:  # Pillow raises many kinds for bad files; any of them means "no preview"
        return False
    write_atomic(dst, lambda f: rgb.save(f, "JPEG", quality=85), durable=False)  # a cache: no fsync
    return True


def make_thumbnails(out: Path, rows: list[Row], max_megapixels: float = MAX_MEGAPIXELS) -> Thumbs:
    """Thumbnails of every source and output, made only where missing or older than their image (the
    runner writes an output's own as it writes the output). A source over the run's max_megapixels (a
    pair the run failed as too_large) gets none: decoding it, on every core at once, is what the limit
    prevents."""
    (out / THUMBS).mkdir(exist_ok=True)
    content, style, output = {}, {}, {}
    for r in rows:
        content[r.content] = thumb_path("c", r.content_path)
        style[r.style] = thumb_path("s", r.style_path)
        if r.state == "done":
            output[r.id] = thumb_path("o", r.output)
    limit = max_megapixels * 1e6
    sources = {content[r.content]: (Path(r.content_path), limit) for r in rows}
    sources |= {style[r.style]: (Path(r.style_path), limit) for r in rows}
    # Outputs: this run's own files, as large as 'size' makes them (the limit is about inputs).
    sources |= {output[r.id]: (out / r.output, float("inf")) for r in rows if r.id in output}
    # First only the dates (two stats each): at 200,000 pairs nearly all are fresh, and a thread pool
    # handed every one of them would cost more than the stats.
    ok = {name: _fresh(src, out / name) for name, (src, _) in sources.items()}
    todo = [name for name, fresh in ok.items() if fresh is False]
    # Decoding, resizing and encoding release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ok |= dict(zip(todo, pool.map(lambda name: _make_thumbnail(sources[name][0], out / name, sources[name][1]),
                                      todo)))
    return Thumbs(*({k: name for k, name in d.items() if ok[name]} for d in (content, style, output)))


# -- loss curves -----------------------------------------------------------------------------------

class _Curves:
    """Each pair's curve for the pages: the ledger's stored one, looked up a page at a time; for a pair
    without one (a run from before schema 4, a failed or running pair) losses.csv, read once and only
    when it is under CURVE_CSV_MAX_BYTES (at 200,000 pairs it holds millions of rows)."""

    def __init__(self, ledger: LedgerSet, log: Path, rows: list[Row]):
        self.ledger, self.log, self.rows = ledger, log, rows
        self._csv: dict[tuple[str, str], list[Point]] | None = None

    def stored(self, rows: list[Row]) -> dict[int, str]:
        return self.ledger.curves(r.id for r in rows)

    def _lacking(self, rows: list[Row], stored: dict[int, str]) -> list[Row]:
        return [r for r in rows if r.id not in stored and r.attempts and r.state != "pending"]

    def csv_signature(self, rows: list[Row], stored: dict[int, str]) -> tuple | None:
        """What the curves of these pairs read from losses.csv depend on: None when they read nothing."""
        if not self._lacking(rows, stored):
            return None
        try:
            st = self.log.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if st.st_size < CURVE_CSV_MAX_BYTES else None

    def of(self, rows: list[Row], stored: dict[int, str]) -> dict[int, list]:
        got = {i: parse_curve(text) for i, text in stored.items()}
        if self._lacking(rows, stored):
            fallback = self._from_csv()
            got |= {r.id: [(p.step, p.px, p.content, p.style, p.total) for p in fallback[(r.content, r.style)]]
                    for r in rows if r.id not in got and (r.content, r.style) in fallback}
        return got

    def _from_csv(self) -> dict[tuple[str, str], list[Point]]:
        if self._csv is None:
            try:
                small = self.log.stat().st_size < CURVE_CSV_MAX_BYTES
            except OSError:
                small = False
            self._csv = read_curves(self.log, self.rows) if small else {}
        return self._csv


_SERIES = ("content", "style", "total")  # their colours: templates/report.css
_W, _H, _L, _B = 220, 84, 38, 14  # chart size, left and bottom margins (templates/style.html draws with them)


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
    for name, col in zip(_SERIES, cols):
        xy[1::2] = [int(top - v * ky) for v in col]
        series.append((name, fmt % tuple(xy)))  # one C-level format for the whole polyline
    s0 = steps[0]
    kx = (_W - _L - 4) / ((steps[-1] - s0) or 1)
    scales = [(round(_L + (steps[i] - s0) * kx), pxs[i]) for i in range(1, n) if pxs[i] != pxs[i - 1]]
    return Chart(scales, series, f"{hi:.3g}", f"{lo if log else ylo:.3g}", str(s0),
                 f"{steps[-1]} steps{' · log' if log else ''}")


@functools.lru_cache(maxsize=None)
def _xy_format(n: int) -> str:
    return " ".join(["%d,%d"] * n)


@functools.lru_cache(maxsize=256)
def _xs(steps: tuple) -> list[int]:
    """x of each step, whole pixels (a smaller page): the same for every pair logged at these steps."""
    s0 = steps[0]
    kx = (_W - _L - 4) / ((steps[-1] - s0) or 1)
    return [int(_L + 0.5 + (st - s0) * kx) for st in steps]


# -- contact_sheet.jpg -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SheetLayout:
    cell: int
    contents: int  # how many content rows (after the header row) fit
    styles: int


def sheet_layout(n_contents: int, n_styles: int) -> SheetLayout:
    cells = max(n_contents, n_styles) + 1
    cell = max(SHEET_MIN_CELL_PX, min(SHEET_CELL_PX, SHEET_MAX_SIDE // cells))
    fit = SHEET_MAX_SIDE // cell - 1
    return SheetLayout(cell, min(n_contents, fit), min(n_styles, fit))


def _paste_thumb(sheet: Image.Image, path: Path, x: int, y: int, cell: int) -> bool:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (cell, cell))
            fit = ImageOps.contain(im.convert("RGB"), (cell - 4, cell - 4))  # small outputs are scaled up
            sheet.paste(fit, (x + (cell - fit.width) // 2, y + (cell - fit.height) // 2))
    except Exception:  # a thumbnail deleted or damaged meanwhile: leave the cell blank
        return False
    return True


def _label(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int, text: str, font) -> None:
    """Text on a band along the bottom of a cell, cut to fit."""
    while text and draw.textlength(text, font=font) > cell - 6:
        text = text[:-2] + "…" if len(text) > 2 else ""
    h = font.getbbox("Ag")[3] + 4
    draw.rectangle((x, y + cell - h, x + cell - 1, y + cell - 1), fill="#000a")
    draw.text((x + 3, y + cell - h + 2), text, font=font, fill="#fff")


def layout_is_readable(layout: SheetLayout, n_contents: int, n_styles: int) -> bool:
    """One contact_sheet.jpg is enough when it holds every pair with cells large enough for their
    names (SHEET_LABEL_PX): up to 82 photos and 82 styles. Past that, each style gets its own sheet."""
    return layout.cell >= SHEET_LABEL_PX and (layout.contents, layout.styles) == (n_contents, n_styles)


def _contact_sheet(out: Path, grid: _Grid, thumbs: Thumbs, layout: SheetLayout) -> Image.Image:
    cell = layout.cell
    contents, styles = grid.contents[:layout.contents], grid.styles[:layout.styles]
    sheet = Image.new("RGB", ((len(styles) + 1) * cell, (len(contents) + 1) * cell), "white")
    draw = ImageDraw.Draw(sheet, "RGBA")
    font = ImageFont.load_default(size=max(9, cell // 14))
    labels = cell >= SHEET_LABEL_PX
    draw.rectangle((0, 0, sheet.width, cell - 1), fill="#e8e8e8")
    draw.rectangle((0, 0, cell - 1, sheet.height), fill="#e8e8e8")
    for j, style in enumerate(styles, 1):
        if style in thumbs.style:
            _paste_thumb(sheet, out / thumbs.style[style], j * cell, 0, cell)
        if labels:
            _label(draw, j * cell, 0, cell, style, font)
    for i, content in enumerate(contents, 1):
        y = i * cell
        if content in thumbs.content:
            _paste_thumb(sheet, out / thumbs.content[content], 0, y, cell)
        if labels:
            _label(draw, 0, y, cell, content, font)
        for j, style in enumerate(styles, 1):
            _sheet_cell(draw, sheet, out, grid.cells.get((content, style)), thumbs, j * cell, y, cell, font)
    return sheet


def style_sheet_shape(n_contents: int) -> tuple[int, int]:
    """(columns, rows of photos) of a style's own sheet: SHEET_STYLE_COLUMNS wide, the first
    SHEET_STYLE_MAX photos (the style's pages have them all)."""
    n = min(n_contents, SHEET_STYLE_MAX)
    cols = max(1, min(n, SHEET_STYLE_COLUMNS))
    return cols, -(-n // cols)


def _style_sheet(out: Path, grid: _Grid, style: str, thumbs: Thumbs) -> Image.Image:
    """One style's outputs, labelled with their photos, under a header row with the painting."""
    cell = SHEET_STYLE_CELL_PX
    cols, rows = style_sheet_shape(len(grid.contents))
    sheet = Image.new("RGB", (cols * cell, (rows + 1) * cell), "white")
    draw = ImageDraw.Draw(sheet, "RGBA")
    font = ImageFont.load_default(size=max(9, cell // 14))
    draw.rectangle((0, 0, sheet.width, cell - 1), fill="#e8e8e8")
    if style in thumbs.style:
        _paste_thumb(sheet, out / thumbs.style[style], 0, 0, cell)
    draw.text((cell + 12, cell // 2), style, font=ImageFont.load_default(size=24), fill="#000", anchor="lm")
    for n, content in enumerate(grid.contents[:cols * rows]):
        x, y = n % cols * cell, (n // cols + 1) * cell
        _sheet_cell(draw, sheet, out, grid.cells.get((content, style)), thumbs, x, y, cell, font)
        _label(draw, x, y, cell, content, font)
    return sheet


def _sheet_key(out: Path, grid: _Grid, thumbs: Thumbs, cells: list[tuple[str, str]], layout: object,
               headers: list[str | None]) -> str:
    """What a sheet shows: each cell's names, state and thumbnail (with its date), the headers'
    thumbnails, the layout. Stored in the JPEG's comment, so a report run again over 200,000 pairs
    redraws only the sheets whose pairs changed."""
    def mtime(rel: str | None) -> int:
        try:
            return os.stat(out / rel).st_mtime_ns if rel else 0
        except OSError:
            return 0

    h = hashlib.sha1(repr(layout).encode())
    for thumb in headers:
        h.update(repr((thumb, mtime(thumb))).encode())
    for c, s in cells:
        r = grid.cells.get((c, s))
        thumb = thumbs.output.get(r.id) if r is not None and r.state == "done" else None
        h.update(repr((c, s, r and r.state, r and r.error_kind, thumb, mtime(thumb))).encode())
    return h.hexdigest()


def _sheet_unless_same(path: Path, key: str, make) -> None:
    try:
        with Image.open(path) as im:  # reads the header only
            if im.info.get("comment") == key.encode():
                return
    except Exception:  # missing, or not a sheet of ours: make it
        pass
    sheet = make()
    write_atomic(path, lambda f: sheet.save(f, "JPEG", quality=85, comment=key))


def _slug(name: str) -> str:
    """A file-name-safe hint of a user's name, for a person browsing the folder (the index before it
    keeps names unique)."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in Path(name).stem)
    return stem.strip("_")[:40] or "style"


def _sheet_cell(draw, sheet, out: Path, row: Row | None, thumbs: Thumbs, x: int, y: int, cell: int, font) -> None:
    if row is None:
        return
    if row.state == "done" and row.id in thumbs.output and _paste_thumb(sheet, out / thumbs.output[row.id],
                                                                        x, y, cell):
        return
    box = (x + 2, y + 2, x + cell - 3, y + cell - 3)
    if row.state == "failed":
        draw.rectangle(box, fill="#fde8e8", outline="#c53030", width=2)
        draw.line(box, fill="#c53030", width=3)
        draw.line((box[0], box[3], box[2], box[1]), fill="#c53030", width=3)
        text = row.error_kind or "failed"
    else:
        draw.rectangle(box, fill="#f0f0f0", outline="#bbb")
        text = row.state if row.state != "done" else "no preview"
    draw.text((x + cell / 2, y + cell / 2), text, font=font, fill="#000", anchor="mm",
              stroke_width=2, stroke_fill="#fff")



# -- the pages ----------------------------------------------------------------------------------------

_STATE_ORDER = ("done", "failed", "running", "pending")
_ENV = None


def _render(template: str, **context) -> str:
    """Render one of nst_batch/templates with autoescaping on: every value is escaped unless it is
    marked safe, and nothing here marks user data safe."""
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("nst_batch.report", "templates"), autoescape=True,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return _ENV.get_template(template).render(**context)


def _href(rel: str, up: int = 0) -> str:
    """A link to OUT/rel from a page `up` folders below OUT: relative, percent-encoded (names may hold
    '#', '?', '%' or spaces); the template escapes it for the attribute."""
    return "../" * up + quote(rel)


def _num(v: object, fmt: str = "{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


@dataclass(frozen=True)
class StylePage:
    k: int  # the style's number, from 1, in plan order
    style: str
    page: int  # from 1
    pages: int
    contents: list[str]

    @property
    def path(self) -> str:
        return page_path(self.k, self.page)


def page_path(k: int, page: int) -> str:
    return f"{STYLES}/{k}.html" if page == 1 else f"{STYLES}/{k}-{page}.html"


def style_pages(grid: _Grid, rows_per_page: int | None = None) -> list[StylePage]:
    """Each style's photos in plan order, PAGE_ROWS to a page, so no page grows with the collection."""
    rows_per_page = rows_per_page or PAGE_ROWS
    chunks = [grid.contents[i:i + rows_per_page] for i in range(0, len(grid.contents), rows_per_page)] or [[]]
    return [StylePage(k, style, n, len(chunks), chunk) for k, style in enumerate(grid.styles, 1)
            for n, chunk in enumerate(chunks, 1)]


def _counts(rows: Iterable[Row]) -> dict[str, int]:
    c = dict.fromkeys(_STATE_ORDER, 0)
    for r in rows:
        c[r.state] += 1
    return c


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _front_context(out: Path, grid: _Grid, settings: dict, s: Summary, thumbs: Thumbs, pages: list[StylePage],
                   layout: SheetLayout, sheets: dict[int, str]) -> dict:
    per_style = []
    for k, style in enumerate(grid.styles, 1):
        rows = [r for c in grid.contents if (r := grid.cells.get((c, style))) is not None]
        done = [r for r in rows if r.state == "done"]
        n_pages = next(p.pages for p in pages if p.k == k)
        per_style.append({
            "k": k, "name": style, "thumb": _opt_href(thumbs.style.get(style)), "counts": _counts(rows),
            "seconds": _num(_mean([r.seconds for r in done if r.seconds is not None]), "{:.1f}"),
            "total": _num(_mean([r.total_loss for r in done if r.total_loss is not None])),
            "pages": [(n, _href(page_path(k, n))) for n in range(1, n_pages + 1)],
            "sheet": _href(sheets[k]) if k in sheets else None})
    pos = {c: i for i, c in enumerate(grid.contents)}
    kinds: dict[str, int] = {}
    for f in s.failures:
        kinds[f["kind"] or ""] = kinds.get(f["kind"] or "", 0) + 1
    k_of = {style: k for k, style in enumerate(grid.styles, 1)}
    failures = [{**f, "page": _href(page_path(k_of[f["style"]], pos[f["content"]] // PAGE_ROWS + 1))
                 + "#" + _anchor(grid.cells[(f["content"], f["style"])].id)}
                for f in s.failures[:FRONT_LIST_MAX]]
    c = s.counts
    return {
        "title": f"nst-batch report: {out.resolve().name}", "out": str(out.resolve()),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "summary_csv": SUMMARY_CSV,
        "contact_sheet": CONTACT_SHEET, "s": s, "c": c, "states": _STATE_ORDER,
        "n_contents": len(grid.contents), "n_styles": len(grid.styles),
        "compute": _dur(s.seconds_total), "mean": f"{s.seconds_mean:.1f} s" if s.seconds_mean else "-",
        "rate": f"{s.pairs_per_hour:.1f}" if s.pairs_per_hour else "-", "eta": _dur(s.eta_s),
        "refresh": f"nst-batch report {shlex.quote(str(out))}",
        "sheet_partial": (layout.contents, layout.styles) != (len(grid.contents), len(grid.styles)),
        "layout": layout, "sheet_max": SHEET_MAX_SIDE, "per_style_sheets": bool(sheets),
        "sheet_style_max": SHEET_STYLE_MAX, "page_rows": PAGE_ROWS,
        "styles": per_style, "failures": failures, "kinds": sorted(kinds.items()),
        "retry": retry_commands(out, s.failures) if s.failures else [],
        "skipped_line": skipped_line(s.skipped) if s.skipped else "",
        "skipped": [{"key": k.key, "path": printable(k.path), "why": k.why} for k in s.skipped[:FRONT_LIST_MAX]],
        "skipped_open": len(s.skipped) <= OPEN_SECTIONS_UP_TO, "list_max": FRONT_LIST_MAX,
        "settings": [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in settings.items()],
        "series": _SERIES, "methods": method_line(s.method_counts),
        "previews": f"{PREVIEWS}/index.html" if (out / PREVIEWS / "index.html").is_file() else None,
    }


_LOSSES = (("content", "content_loss"), ("style", "style_loss"), ("tv", "tv_loss"), ("total", "total_loss"))


def _chart(points: list[tuple]) -> Chart | None:
    try:
        return loss_chart(points)
    except (TypeError, ValueError, ZeroDivisionError):  # a damaged stored curve: no chart, not a crash
        return None


def _opt_href(rel: str | None, up: int = 0) -> str | None:
    return None if rel is None else _href(rel, up)


def _anchor(pair_id: int) -> str:
    return f"p{pair_id}"


def _style_context(out: Path, grid: _Grid, thumbs: Thumbs, page: StylePage, pages: list[StylePage],
                   rows: list[Row], points: dict[int, list], sheets: dict[int, str],
                   methods: dict[tuple[str, str], str], model: dict | None) -> dict:
    cards = []
    for r in rows:
        msg = r.error_message or ""
        on_disk = r.id in grid.on_disk
        thumb = thumbs.output.get(r.id)
        src = thumbs.content.get(r.content)
        cards.append({
            "id": _anchor(r.id), "content": r.content, "state": r.state, "name": f"{r.style} × {r.content}",
            "kind": r.error_kind or "failed", "message": msg, "short": msg if len(msg) <= 160 else msg[:157] + "…",
            "href": _href(r.output, 1) if on_disk else None,
            # Thumbnail names are ours (hex digits): nothing to percent-encode.
            "thumb": "../" + thumb if on_disk and thumb else None, "src": "../" + src if src else None,
            "note": r.note,
            "meta": (f"{shown(r, 'method', methods)} · " if r.state == "done" else "")
                    + f"attempts {r.attempts} · steps {_num(shown(r, 'steps'), '{}') or '-'} · "
                    f"{_num(shown(r, 'seconds'), '{:.1f}') or '-'} s",
            "losses": " · ".join(f"{name} {v}" for name, col in _LOSSES if (v := _num(shown(r, col)))),
            "chart": _chart(points.get(r.id, [])),
        })
    mine = [p for p in pages if p.k == page.k]
    all_rows = [r for c in grid.contents if (r := grid.cells.get((c, page.style))) is not None]
    first = (page.page - 1) * PAGE_ROWS
    return {
        "title": f"{page.style}: nst-batch report: {out.resolve().name}", "style": page.style, "k": page.k,
        "n_styles": len(grid.styles), "page": page.page, "pages": page.pages,
        "pager": [(p.page, _href(p.path.split("/", 1)[1])) for p in mine],
        "prev_style": _href(page_path(page.k - 1, 1).split("/", 1)[1]) if page.k > 1 else None,
        "next_style": _href(page_path(page.k + 1, 1).split("/", 1)[1]) if page.k < len(grid.styles) else None,
        "front": _href(REPORT_HTML, 1), "thumb": _opt_href(thumbs.style.get(page.style), 1),
        "sheet": _href(sheets[page.k], 1) if page.k in sheets else None,
        "counts": _counts(all_rows), "states": _STATE_ORDER, "first": first + 1, "last": first + len(page.contents),
        "n_contents": len(grid.contents), "cards": cards, "series": _SERIES,
        # The style's network (method network): how far it trained, and its training curve (each point
        # the mean of the steps since the one before: training.WindowMean), drawn like a pair's.
        "model": None if model is None else {
            "step": model["step"], "steps": model["steps"], "chart": _chart(parse_curve(model["curve"]))},
    }
