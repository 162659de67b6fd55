#!/usr/bin/env python
"""The README's colour picture: one photo restyled with `colors: style`, `preserve` and `match`.

    python benchmarks/colors_sheet.py                       # from the repository root: docs/colors.jpg

One image, five labelled panels side by side: the photo, the style, then the output of each mode.
The outputs are made by the Engine (the same code `nst-batch run` uses) with the bundled manifest's
settings (pipeline.yaml) at --size px, the mode the only difference. It prints each run's time and
its final / starting loss (for `preserve`, the luminance objective's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_batch.files import decode# noqa: E402
from nst_batch.config import manifest
from nst_batch.files.encode import to_pil  # noqa: E402
from nst_batch.run.jobs import file_engine, file_job  # noqa: E402

CAPTIONS = {"style": "colors: style", "preserve": "colors: preserve", "match": "colors: match"}


def panels_sheet(panels: list[tuple[str, Image.Image]], box: tuple[int, int]) -> Image.Image:
    """Panels in one row, each fitted into `box` on white, its caption in a band under it."""
    font = ImageFont.load_default(size=15)
    band, gap = 26, 6
    w, h = box
    sheet = Image.new("RGB", (len(panels) * (w + gap) - gap, h + band), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, im) in enumerate(panels):
        x = i * (w + gap)
        fit = ImageOps.contain(im, box, Image.Resampling.LANCZOS)
        sheet.paste(fit, (x + (w - fit.width) // 2, (h - fit.height) // 2))
        tw = draw.textlength(caption, font=font)
        draw.text((x + (w - tw) / 2, h + 5), caption, font=font, fill="#222")
    return sheet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--photo", type=Path, default=ROOT / "data/content/chelsea.jpg")
    ap.add_argument("--style", type=Path, default=ROOT / "data/styles/starry_night.jpg")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/colors.jpg")
    args = ap.parse_args()

    base = manifest.load(ROOT / "pipeline.yaml").replace(size=args.size, device=args.device)
    made: list[tuple[str, Image.Image]] = []
    for mode in ("style", "preserve", "match"):
        t0 = time.perf_counter()
        engine = file_engine(base.replace(colors=mode))
        (m,) = engine.make([file_job(engine, args.photo, args.style)])
        if not m.ok:
            raise SystemExit(f"{mode}: {m.error}")
        print(f"{mode:9} {time.perf_counter() - t0:6.1f} s  {m.steps} steps  "
              f"loss {m.final.total:.4g} / start {m.start.total:.4g} = {m.final.total / m.start.total:.3f}")
        made.append((CAPTIONS[mode], to_pil(m.image)))

    photo = decode.load_rgb(args.photo)
    out = made[0][1]
    box = out.size  # every panel the outputs' shape: the photo's aspect at --size
    sheet = panels_sheet([("photo", photo), ("style", decode.load_rgb(args.style)), *made], box)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=88, optimize=True)
    print(f"{args.out}: {sheet.width}x{sheet.height}, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
