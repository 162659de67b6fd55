"""What a run made and what went wrong, as files, read from the ledger while workers may still be going.

(The terminal view is `status`.) `write_report` writes the files a person opens later, all inside OUT and linked by relative paths only, so they keep
working once OUT is zipped and moved:

- report.html: one page, no network, no script: settings, the contents × styles grid of
  thumbnails, per-pair losses, seconds and loss curves (inline SVG), failures and how to retry.
- summary.csv: one row per pair. Text cells that a spreadsheet would run as a formula
  (starting with = + - @, tab or CR) get a leading ' (OWASP's advice); the ledger keeps the names as they are.
- contact_sheet.jpg: the grid as one picture. Cells are 180 px; when (contents + 1) or
  (styles + 1) cells would pass 8000 px, cells shrink to fit, down to 64 px; past that
  (more than 124 contents or styles) the sheet holds the first 124 and report.html says so.
- thumbs/: 256 px JPEGs of every output and source image, remade only when missing or
  older than their image, so re-running the report on a big run is quick.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import shlex
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .files import CONTACT_SHEET, REPORT_HTML, SUMMARY_CSV, THUMBS, write_atomic, write_text_atomic
from .ledger import Ledger, Row
from .losslog import LOSS_LOG, Point, read_curves
from .manifest import Settings
from .names import Skipped, printable, skipped_from, skipped_line
from .status import Summary, _dur, retry_commands, summarize
SUMMARY_COLUMNS = ("content", "style", "state", "attempts", "content_loss", "style_loss", "tv_loss", "total_loss",
                   "seconds", "output", "error_kind", "error_message")

THUMB_PX = 256
MAX_MEGAPIXELS = Settings.max_megapixels  # the manifest's default, for a ledger that stored no settings
SHEET_CELL_PX = 180
SHEET_MIN_CELL_PX = 64
SHEET_MAX_SIDE = 8000
CURVE_MAX_POINTS = 60  # per series: keeps a 5000-pair page small whatever log_every was
OPEN_SECTIONS_UP_TO = 100  # pairs: in bigger runs the per-style sections start closed, so the page opens fast


def _read_ledger(out: Path) -> tuple[list[Row], dict, list[Skipped]]:
    ledger = Ledger(out, readonly=True)
    try:
        return ledger.rows(), ledger.get_meta("settings", {}) or {}, skipped_from(ledger.get_meta("skipped"))
    finally:
        ledger.close()


# -- files ------------------------------------------------------------------------------------------

def write_report(out: Path) -> list[Path]:
    """Write report.html, summary.csv and contact_sheet.jpg (and thumbs/) into OUT; report.html first."""
    # Imported here, not at the top: they load torch, which `status` (a user of this module) never needs.
    from .images import save_atomic

    rows, settings, skipped = _read_ledger(out)
    limit = settings.get("max_megapixels")
    thumbs = make_thumbnails(out, rows, limit if isinstance(limit, (int, float)) else MAX_MEGAPIXELS)
    curves = read_curves(out / LOSS_LOG, rows)
    grid = _Grid.of(out, rows)
    sheet = sheet_layout(len(grid.contents), len(grid.styles))
    paths = [out / REPORT_HTML, out / SUMMARY_CSV, out / CONTACT_SHEET]
    save_atomic(_contact_sheet(out, grid, thumbs, sheet), paths[2], "jpg", quality=85)
    write_text_atomic(paths[1], summary_csv(rows))
    write_text_atomic(paths[0], _page(out, grid, settings, summarize(rows, skipped=skipped), thumbs, curves, sheet))
    return paths


def shown(r: Row, column: str) -> object:
    """A ledger value as the report shows it. A pair that is not done can still hold the losses of an
    earlier, successful attempt (and a pending or running one its seconds): those are not its result."""
    if column in ("steps", "content_loss", "style_loss", "tv_loss", "total_loss") and r.state != "done":
        return None
    if column == "seconds" and r.state not in ("done", "failed"):
        return None
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


def summary_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for r in rows:
        w.writerow([csv_cell(shown(r, c)) for c in SUMMARY_COLUMNS])
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
        return _Grid(list(dict.fromkeys(r.content for r in rows)), list(dict.fromkeys(r.style for r in rows)),
                     {(r.content, r.style): r for r in rows},
                     {r.id for r in rows if r.state == "done" and (out / r.output).is_file()})


# -- thumbnails -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thumbs:
    """Thumbnail paths relative to OUT; a missing key means no preview (no output yet, or undecodable)."""
    content: dict[str, str]
    style: dict[str, str]
    output: dict[int, str]  # by ledger row id


def _thumb_name(kind: str, source: str) -> str:
    # Hashed: names are user data (any characters, any length, case-only differences).
    return f"{THUMBS}/{kind}-{hashlib.sha1(source.encode()).hexdigest()[:16]}.jpg"


def _thumbnail(src: Path, dst: Path, max_pixels: float = float("inf")) -> bool:
    """Make dst from src unless it is already newer; False when src is missing, cannot be decoded, or has
    more than `max_pixels` (read from the header: such an image is never decoded)."""
    try:
        src_mtime = src.stat().st_mtime
    except OSError:
        return False
    try:
        if dst.stat().st_mtime >= src_mtime:
            return True
    except FileNotFoundError:
        pass
    from .images import _to_rgb, heif_support  # the pipeline's colour handling (16-bit, alpha, CMYK); loads torch

    heif_support()  # HEIC sources get a preview too, when the run could read them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is the one below
            with Image.open(src) as im:  # reads the header only
                if im.width * im.height > max_pixels:
                    return False
                im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a fraction of full size, much faster
                im = ImageOps.exif_transpose(im)
                im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
                rgb = _to_rgb(im)
    except Exception:  # Pillow raises many kinds for bad files; any of them means "no preview"
        return False
    write_atomic(dst, lambda f: rgb.save(f, "JPEG", quality=85), durable=False)  # a cache: no fsync
    return True


def make_thumbnails(out: Path, rows: list[Row], max_megapixels: float = MAX_MEGAPIXELS) -> Thumbs:
    """Thumbnails of every source and output. A source over the run's max_megapixels (a pair the run
    failed as too_large) gets none: decoding it, on every core at once, is what the limit prevents."""
    (out / THUMBS).mkdir(exist_ok=True)
    content, style, output = {}, {}, {}
    for r in rows:
        content[r.content] = _thumb_name("c", r.content_path)
        style[r.style] = _thumb_name("s", r.style_path)
        if r.state == "done":
            output[r.id] = _thumb_name("o", r.output)
    limit = max_megapixels * 1e6
    sources = {content[r.content]: (Path(r.content_path), limit) for r in rows}
    sources |= {style[r.style]: (Path(r.style_path), limit) for r in rows}
    # Outputs: this run's own files, as large as 'size' makes them (the limit is about inputs).
    sources |= {output[r.id]: (out / r.output, float("inf")) for r in rows if r.id in output}
    # Decoding, resizing and encoding release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ok = dict(zip(sources, pool.map(lambda name: _thumbnail(sources[name][0], out / name, sources[name][1]),
                                        sources)))
    return Thumbs(*({k: name for k, name in d.items() if ok[name]} for d in (content, style, output)))


def _thin(points: list[Point], n: int) -> list[Point]:
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


_SERIES = (("content", "#2b6cb0"), ("style", "#c53030"), ("total", "#222"))
_W, _H, _L, _B = 220, 84, 38, 14  # chart size, left and bottom margins


def loss_svg(points: list[Point]) -> str:
    """A small chart of content, style and total loss over steps; log y when they span 10× or more."""
    pts = _thin(points, CURVE_MAX_POINTS)
    values = [getattr(p, name) for p in pts for name, _ in _SERIES]
    positive = [v for v in values if v > 0]
    if not positive:
        return '<span class="muted">no losses logged</span>'
    lo, hi = min(positive), max(positive)
    log = hi / lo >= 10
    f = (lambda v: math.log10(max(v, lo))) if log else (lambda v: v)
    ylo, yhi = (f(lo), f(hi)) if log else (min(0.0, min(values)), hi)
    s0, s1 = pts[0].step, pts[-1].step

    def x(step: int) -> float:
        return _L + (step - s0) / ((s1 - s0) or 1) * (_W - _L - 4)

    def y(v: float) -> float:
        return 4 + (1 - (f(v) - ylo) / ((yhi - ylo) or 1)) * (_H - _B - 8)

    parts = [f'<svg class="curve" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="loss over steps">',
             f'<path d="M{_L} 4V{_H - _B}H{_W}" class="axis"/>']
    for a, b in zip(pts, pts[1:]):
        if b.px != a.px:  # a new scale starts here
            parts.append(f'<path d="M{x(b.step):.0f} 4V{_H - _B}" class="scale"/>'
                         f'<text x="{x(b.step) + 2:.0f}" y="12" class="lbl">{b.px}px</text>')
    for name, colour in _SERIES:
        xy = " ".join(f"{x(p.step):.0f},{y(getattr(p, name)):.0f}" for p in pts)  # whole pixels: a smaller page
        parts.append(f'<polyline points="{xy}" stroke="{colour}" class="{name}"/>')
    parts.append(f'<text x="{_L - 3}" y="10" class="lbl r">{hi:.3g}</text>'
                 f'<text x="{_L - 3}" y="{_H - _B}" class="lbl r">{lo if log else ylo:.3g}</text>'
                 f'<text x="{_L}" y="{_H - 2}" class="lbl">{s0}</text>'
                 f'<text x="{_W - 2}" y="{_H - 2}" class="lbl r">{s1} steps{" · log" if log else ""}</text></svg>')
    return "".join(parts)


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


def _contact_sheet(out: Path, grid: _Grid, thumbs: Thumbs, layout: SheetLayout) -> Image.Image:
    cell = layout.cell
    contents, styles = grid.contents[:layout.contents], grid.styles[:layout.styles]
    sheet = Image.new("RGB", ((len(styles) + 1) * cell, (len(contents) + 1) * cell), "white")
    draw = ImageDraw.Draw(sheet, "RGBA")
    font = ImageFont.load_default(size=max(9, cell // 14))
    labels = cell >= 96
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


# -- report.html ------------------------------------------------------------------------------------

_STATE_ORDER = ("done", "failed", "running", "pending")


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _href(rel: str) -> str:
    return _e(quote(rel))


def _num(v: object, fmt: str = "{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 48px;color:#222;background:#fafafa}
h1{margin:20px 0 4px}h2{margin:32px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#777}.banner{padding:8px 12px;border-radius:4px;margin:8px 0}
.warn{background:#fff4d6}.bad{background:#fde8e8}
code,pre{background:#eee;padding:2px 5px;border-radius:3px}pre{padding:8px;overflow:auto}
table{border-collapse:collapse}td,th{padding:3px 8px;text-align:left;vertical-align:top}
.data td,.data th{border-bottom:1px solid #e4e4e4;max-width:32em}
.data td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid th,.grid td{padding:4px;width:136px;border:1px solid #e4e4e4;background:#fff}
.grid thead th{position:sticky;top:0;z-index:1;background:#eee}
.grid img,.ph{width:128px;height:128px;object-fit:contain;display:block}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;background:#f0f0f0;color:#666}
.name{font-size:12px;word-break:break-all;font-weight:600}.cap{font-size:11px;color:#555}
.err{width:128px;min-height:128px;background:#fde8e8;border:2px solid #c53030;font-size:11px;overflow-wrap:anywhere}
.err b{display:block;color:#c53030;font-size:13px}
.st{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee}
.st-done{background:#def7e5}.st-failed{background:#fde8e8}.st-running{background:#fff4d6}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
svg.curve{display:block}svg .axis,svg .scale{stroke:#999;fill:none}svg .scale{stroke-dasharray:2 2}
svg polyline{fill:none;stroke-width:1.5}svg .lbl{font-size:9px;fill:#666}svg .r{text-anchor:end}
.key span{display:inline-block;width:14px;height:3px;margin:0 4px 3px 10px}
"""


def _page(out: Path, grid: _Grid, settings: dict, summary: Summary, thumbs: Thumbs,
          curves: dict[tuple[str, str], list[Point]], sheet: SheetLayout) -> str:
    title = f"nst-batch report: {out.resolve().name}"
    parts = [f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width,initial-scale=1">'
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             *_overview(out, summary, grid, sheet),
             *_contact_grid(grid, thumbs),
             *_failures(out, summary),
             *_skipped(summary.skipped),
             *_per_style(grid, curves),
             *_settings(settings),
             "</body></html>\n"]
    return "\n".join(parts)


def _overview(out: Path, s: Summary, grid: _Grid, sheet: SheetLayout) -> Iterable[str]:
    c = s.counts
    yield (f'<p class="muted">{_e(out.resolve())} · written {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} · '
           f'<a href="{SUMMARY_CSV}">summary.csv</a> · <a href="{CONTACT_SHEET}">contact_sheet.jpg</a></p>')
    yield (f"<p><b>{s.total}</b> pairs ({len(grid.contents)} contents × {len(grid.styles)} styles): "
           + " · ".join(f'<span class="st st-{k}">{c[k]} {k}</span>' for k in _STATE_ORDER) + "</p>")
    rate = f"{s.pairs_per_hour:.1f}" if s.pairs_per_hour else "-"
    mean = f"{s.seconds_mean:.1f} s" if s.seconds_mean else "-"
    yield (f'<table class="data"><tr><th>compute, all done pairs</th><td class="n">{_dur(s.seconds_total)}</td>'
           f'<th>mean per pair</th><td class="n">{mean}</td><th>pairs/hour</th><td class="n">{rate}</td>'
           f'<th>ETA</th><td class="n">{_dur(s.eta_s)}</td></tr></table>')
    if c["pending"] or c["running"]:
        yield (f'<p class="banner warn">The run is not finished ({c["pending"]} pending, {c["running"]} running): '
               f"this is a snapshot. <code>nst-batch report {_e(shlex.quote(str(out)))}</code> refreshes it.</p>")
    if c["failed"]:
        yield f'<p class="banner bad">{c["failed"]} pair(s) failed: see <a href="#failures">Failures</a>.</p>'
    if s.skipped:
        yield f'<p class="banner warn">{_e(skipped_line(s.skipped))}: see <a href="#skipped">Skipped</a>.</p>'
    if (sheet.contents, sheet.styles) != (len(grid.contents), len(grid.styles)):
        yield (f'<p class="muted">{CONTACT_SHEET} holds the first {sheet.contents} contents and '
               f"{sheet.styles} styles (at most {SHEET_MAX_SIDE} px a side); this page has them all.</p>")


def _contact_grid(grid: _Grid, thumbs: Thumbs) -> Iterable[str]:
    yield '<h2 id="grid">Contact sheet</h2><table class="grid"><thead><tr><th></th>'
    for k, style in enumerate(grid.styles):
        yield (f'<th><a href="#style-{k}">{_img(thumbs.style.get(style), style)}'
               f'<div class="name">{_e(style)}</div></a></th>')
    yield "</tr></thead><tbody>"
    for content in grid.contents:
        cells = "".join(_grid_cell(grid.cells.get((content, style)), grid, thumbs) for style in grid.styles)
        yield (f'<tr><th>{_img(thumbs.content.get(content), content)}<div class="name">{_e(content)}</div></th>'
               f"{cells}</tr>")
    yield "</tbody></table>"


def _img(thumb: str | None, alt: str) -> str:
    if thumb is None:
        return '<div class="ph">no preview</div>'
    return f'<img src="{_href(thumb)}" alt="{_e(alt)}" loading="lazy" decoding="async">'


def _grid_cell(r: Row | None, grid: _Grid, thumbs: Thumbs) -> str:
    if r is None:
        return "<td></td>"
    if r.state == "failed":
        msg = r.error_message or ""
        short = msg if len(msg) <= 160 else msg[:157] + "…"
        return f'<td><div class="err" title="{_e(msg)}"><b>{_e(r.error_kind or "failed")}</b>{_e(short)}</div></td>'
    if r.state != "done":
        return f'<td><div class="ph"><span class="st st-{r.state}">{r.state}</span></div></td>'
    name = f"{r.style} × {r.content}"
    cap = f'<div class="cap">{_num(r.seconds, "{:.1f}")} s · total {_num(r.total_loss)}</div>'
    if r.id not in grid.on_disk:
        return f'<td><div class="ph">output missing</div>{cap}</td>'
    return f'<td><a href="{_href(r.output)}" title="{_e(name)}">{_img(thumbs.output.get(r.id), name)}</a>{cap}</td>'


def _failures(out: Path, s: Summary) -> Iterable[str]:
    if not s.failures:
        return
    yield f'<h2 id="failures">Failures ({len(s.failures)})</h2><p>Re-run them with the same settings:</p>'
    yield "<pre>" + "\n".join(_e(cmd) for cmd in retry_commands(out, s.failures)) + "</pre>"
    yield '<table class="data"><tr><th>style</th><th>content</th><th>kind</th><th>attempts</th><th>reason</th></tr>'
    for f in s.failures:
        yield (f"<tr><td>{_e(f['style'])}</td><td>{_e(f['content'])}</td><td>{_e(f['kind'] or '')}</td>"
               f"<td class=\"n\">{f['attempts']}</td><td>{_e(f['message'] or '')}</td></tr>")
    yield "</table>"


def _skipped(skipped: list[Skipped]) -> Iterable[str]:
    if not skipped:
        return
    yield (f'<h2 id="skipped">Skipped input files ({len(skipped)})</h2><p>In the content and styles folders '
           "but not used, and why:</p>")
    is_open = " open" if len(skipped) <= OPEN_SECTIONS_UP_TO else ""
    yield (f'<details{is_open}><summary>{_e(skipped_line(skipped))}</summary>'
           '<table class="data"><tr><th>folder</th><th>path</th><th>reason</th></tr>')
    for k in skipped:
        yield f"<tr><td>{_e(k.key)}</td><td>{_e(printable(k.path))}</td><td>{_e(k.why)}</td></tr>"
    yield "</table></details>"


def _per_style(grid: _Grid, curves: dict[tuple[str, str], list[Point]]) -> Iterable[str]:
    yield ('<h2 id="styles">Per style: final losses, seconds, loss curves</h2><p class="key">'
           + "".join(f'<span style="background:{colour}"></span>{name}' for name, colour in _SERIES)
           + ' loss over optimisation steps; a dashed line marks the start of a larger scale.</p>')
    is_open = " open" if len(grid.cells) <= OPEN_SECTIONS_UP_TO else ""
    for k, style in enumerate(grid.styles):
        rows = [grid.cells[(c, style)] for c in grid.contents if (c, style) in grid.cells]
        counts = " · ".join(f"{n} {state}" for state in _STATE_ORDER if (n := sum(r.state == state for r in rows)))
        yield (f'<details id="style-{k}"{is_open}><summary>{_e(style)} <span class="muted">({counts})</span>'
               '</summary><table class="data"><tr><th>content</th><th>state</th><th>attempts</th><th>steps</th>'
               "<th>seconds</th><th>content loss</th><th>style loss</th><th>tv loss</th><th>total loss</th>"
               "<th>loss curves</th></tr>")
        for r in rows:
            yield _style_row(r, r.id in grid.on_disk, curves.get((r.content, r.style), []))
        yield "</table></details>"


def _style_row(r: Row, on_disk: bool, points: list[Point]) -> str:
    name = f'<a href="{_href(r.output)}">{_e(r.content)}</a>' if on_disk else _e(r.content)
    state = f'<span class="st st-{r.state}">{r.state}</span>'
    if r.state == "failed":
        state += f"<br><b>{_e(r.error_kind or '')}</b>: {_e(r.error_message or '')}"
    if r.note:
        state += f'<br><span class="muted">{_e(r.note)}</span>'
    nums = "".join(f'<td class="n">{v}</td>' for v in (
        r.attempts, _num(shown(r, "steps"), "{}"), _num(shown(r, "seconds"), "{:.1f}"),
        *(_num(shown(r, c)) for c in ("content_loss", "style_loss", "tv_loss", "total_loss"))))
    curve = loss_svg(points) if points else '<span class="muted">-</span>'
    return f"<tr><td>{name}</td><td>{state}</td>{nums}<td>{curve}</td></tr>"


def _settings(settings: dict) -> Iterable[str]:
    yield '<h2 id="settings">Settings</h2>'
    if not settings:
        yield '<p class="muted">The ledger holds no settings.</p>'
        return
    yield '<table class="data">'
    for key, value in settings.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        yield f"<tr><th>{_e(key)}</th><td><code>{_e(shown)}</code></td></tr>"
    yield "</table>"
