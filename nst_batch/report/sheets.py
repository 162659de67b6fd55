"""contact_sheet.jpg, the grid as one picture, and per-style sheets when one picture cannot show a run.

Cells are 180 px; when (contents + 1) or (styles + 1) cells would pass 8000 px, cells shrink to fit,
down to 64 px; past that (more than 124 contents or styles) the sheet holds the first 124. When it cannot
hold every pair with cells of SHEET_LABEL_PX or more (past 82 photos or styles), each style also gets
contact_sheets/<k>-<name>.jpg: its first SHEET_STYLE_MAX outputs, SHEET_STYLE_COLUMNS a row, 120 px.
Each sheet keeps a key of what it shows in its JPEG comment and is drawn again only when that changes.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..batch.ledger import Row
from ..files.layout import CONTACT_SHEET, SHEETS, write_atomic
from .grid import Grid
from .thumbs import Thumbs

SHEET_CELL_PX = 180
SHEET_MIN_CELL_PX = 64
SHEET_MAX_SIDE = 8000
SHEET_LABEL_PX = 96  # cells from this size up carry their names
SHEET_STYLE_COLUMNS = 20
SHEET_STYLE_MAX = 200  # photos on a style's own sheet: 20 × 10 cells (the style's pages have them all)
SHEET_STYLE_CELL_PX = 120  # half a thumbnail: JPEG decodes it at half scale, so a sheet is quick to draw


@dataclass(frozen=True)
class SheetLayout:
    cell: int
    contents: int  # how many content rows (after the header row) fit
    styles: int


@dataclass(frozen=True)
class Sheets:
    """What write_sheets drew: the main sheet's layout and, when it is not enough, each style's sheet."""
    layout: SheetLayout
    per_style: dict[int, str]  # style number -> its sheet, relative to OUT ({} when one sheet shows all)
    written: list[Path]


def sheet_layout(n_contents: int, n_styles: int) -> SheetLayout:
    cells = max(n_contents, n_styles) + 1
    cell = max(SHEET_MIN_CELL_PX, min(SHEET_CELL_PX, SHEET_MAX_SIDE // cells))
    fit = SHEET_MAX_SIDE // cell - 1
    return SheetLayout(cell, min(n_contents, fit), min(n_styles, fit))


def layout_is_readable(layout: SheetLayout, n_contents: int, n_styles: int) -> bool:
    """One contact_sheet.jpg is enough when it holds every pair with cells large enough for their
    names (SHEET_LABEL_PX): up to 82 photos and 82 styles. Past that, each style gets its own sheet."""
    return layout.cell >= SHEET_LABEL_PX and (layout.contents, layout.styles) == (n_contents, n_styles)


def style_sheet_shape(n_contents: int) -> tuple[int, int]:
    """(columns, rows of photos) of a style's own sheet: SHEET_STYLE_COLUMNS wide, the first
    SHEET_STYLE_MAX photos (the style's pages have them all)."""
    n = min(n_contents, SHEET_STYLE_MAX)
    cols = max(1, min(n, SHEET_STYLE_COLUMNS))
    return cols, -(-n // cols)


def write_sheets(out: Path, grid: Grid, thumbs: Thumbs) -> Sheets:
    """contact_sheet.jpg, and contact_sheets/*.jpg when it cannot show every pair readably; each only
    when what it shows changed."""
    layout = sheet_layout(len(grid.contents), len(grid.styles))
    shown_c, shown_s = grid.contents[:layout.contents], grid.styles[:layout.styles]
    cells = [(c, s) for c in shown_c for s in shown_s]
    headers = [thumbs.content.get(c) for c in shown_c] + [thumbs.style.get(s) for s in shown_s]
    written = [out / CONTACT_SHEET]
    _sheet_unless_same(written[0], _sheet_key(out, grid, thumbs, cells, (layout, shown_c, shown_s), headers),
                       lambda: _contact_sheet(out, grid, thumbs, layout))
    per_style = {}
    if not layout_is_readable(layout, len(grid.contents), len(grid.styles)):
        per_style = {k: f"{SHEETS}/{k}-{slug(style)}.jpg" for k, style in enumerate(grid.styles, 1)}
    shape = style_sheet_shape(len(grid.contents))

    def style_sheet(k: int) -> None:
        style = grid.styles[k - 1]
        cells = [(c, style) for c in grid.contents[:shape[0] * shape[1]]]
        key = _sheet_key(out, grid, thumbs, cells, (SHEET_STYLE_CELL_PX, shape, style), [thumbs.style.get(style)])
        _sheet_unless_same(out / per_style[k], key, lambda: _style_sheet(out, grid, style, thumbs))

    # Decoding, scaling and drawing release the GIL: a collection's 20 sheets are drawn side by side.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(style_sheet, per_style))
    return Sheets(layout, per_style, written + [out / rel for rel in per_style.values()])


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


def _contact_sheet(out: Path, grid: Grid, thumbs: Thumbs, layout: SheetLayout) -> Image.Image:
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


def _style_sheet(out: Path, grid: Grid, style: str, thumbs: Thumbs) -> Image.Image:
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


def _sheet_key(out: Path, grid: Grid, thumbs: Thumbs, cells: list[tuple[str, str]], layout: object,
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


def slug(name: str) -> str:
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
