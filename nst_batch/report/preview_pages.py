"""The preview's pages: OUT/previews/index.html, a page and a JPEG contact sheet per style. Rows are the
sample photos, columns the strengths, each column labelled with the `per_style` line that gives it.

Read from OUT/previews/preview.json (written by `nst-batch preview`, run/preview.py) and the files on
disk: this layer never reaches the run, so the grid comes as data. A cell whose output is missing (it
failed, or the preview was stopped) is shown as not made.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError
from ..files.layout import PREVIEWS, write_atomic, write_text_atomic
from .pages import render

PREVIEW_JSON = "preview.json"
INDEX = "index.html"
CELL = 160  # px a cell on pages and sheets: previews are small; shown a little larger they read better
HEAD = 44  # the sheet's column-label band

def _num(v: float) -> str:
    return f"{v:.4g}"


def _style_view(k: int, st: dict, photos: list[dict], folder: Path) -> dict:
    """One style's page context: hrefs relative to OUT/previews/, None where a cell's file is missing."""
    cols = st["columns"]
    rows = [{"name": p["name"], "image": quote(p["image"]),
             "cells": [quote(c["outputs"][i]) if (folder / c["outputs"][i]).is_file() else None for c in cols]}
            for i, p in enumerate(photos)]
    return {"name": st["name"], "image": quote(st["image"]), "page": f"style-{k}.html", "sheet": f"sheet-{k}.jpg",
            "rows": rows, "columns": [{"label": c["label"], "weight_text": _num(c["weight"]),
                                       "factor_text": f"{c['factor']:.3g}"} for c in cols]}


def write_pages(out: Path) -> tuple[Path, int]:
    """Write the index, the style pages and sheets under OUT/previews/. Returns the index's path and the
    number of cells not made."""
    folder = out / PREVIEWS
    try:
        grid = json.loads((folder / PREVIEW_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: no preview to show ({e}); run 'nst-batch preview' first") from None
    photos = grid["photos"]
    views = [_style_view(k, st, photos, folder) for k, st in enumerate(grid["styles"], 1)]
    missing = sum(cell is None for v in views for row in v["rows"] for cell in row["cells"])
    for k, v in enumerate(views, 1):
        write_text_atomic(folder / v["page"], render("preview_style.html", title=f"Preview: {v['name']}", st=v,
                                                      cell=CELL))
        sheet = contact_sheet(folder, grid["styles"][k - 1], photos)
        write_atomic(folder / v["sheet"], lambda f, s=sheet: f.write(s))
    index = folder / INDEX
    write_text_atomic(index, render("preview_index.html", title="Previews: style weights", styles=views,
                                     n_photos=len(photos), n_strengths=len(grid["styles"][0]["columns"]) if views
                                     else 0, size=grid["size"], steps=grid["steps"], missing=missing))
    return index, missing


def _paste(sheet: Image.Image, path: Path, x: int, y: int) -> None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = CELL / max(im.size)  # small previews are enlarged to the cell
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
    except OSError:
        return  # not made: the cell stays grey
    sheet.paste(im, (x + (CELL - im.width) // 2, y + (CELL - im.height) // 2))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def contact_sheet(folder: Path, style: dict, photos: list[dict]) -> bytes:
    """A JPEG: the style's name on top, one row a photo (the photo first), one column a strength
    labelled with its style_weight."""
    cols = style["columns"]
    gap = 4
    w = (CELL + gap) * (len(cols) + 1) + gap
    h = HEAD * 2 + (CELL + gap) * len(photos) + gap
    sheet = Image.new("RGB", (w, h), "#fff")
    draw = ImageDraw.Draw(sheet)
    small, big = ImageFont.load_default(size=14), ImageFont.load_default(size=20)
    draw.text((gap, HEAD // 2), _fit(draw, f"style: {style['name']}", w - 2 * gap, big), font=big, fill="#000",
              anchor="lm")
    draw.text((gap + CELL // 2, HEAD + HEAD // 2), "photo", font=small, fill="#444", anchor="mm")
    for j, c in enumerate(cols, 1):
        x = gap + j * (CELL + gap)
        text = _fit(draw, f"style_weight {_num(c['weight'])}", CELL, small)
        draw.text((x + CELL // 2, HEAD + HEAD // 3), text, font=small, fill="#000", anchor="mm")
        draw.text((x + CELL // 2, HEAD + 2 * HEAD // 3 + 2), f"x{c['factor']:.3g}", font=small, fill="#666",
                  anchor="mm")
    for i, p in enumerate(photos):
        y = HEAD * 2 + gap + i * (CELL + gap)
        draw.rectangle((gap, y, w - gap, y + CELL - 1), fill="#eee")
        _paste(sheet, folder / p["image"], gap, y)
        for j, c in enumerate(cols, 1):
            _paste(sheet, folder / c["outputs"][i], gap + j * (CELL + gap), y)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    return buf.getvalue()
