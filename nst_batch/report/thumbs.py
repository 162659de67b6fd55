"""thumbs/: 240 px JPEGs of every output and source image, for the pages and the contact sheets.

The runner writes an output's own from the image in memory (images.write_thumbnail); the report makes
any that is missing or older than its image (older runs), so re-running the report on a big run is quick.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..batch.ledger import Row
from ..config.manifest import Settings
from ..files.images import THUMB_PX, shrink
from ..files.layout import THUMBS, thumb_path, write_atomic

MAX_MEGAPIXELS = Settings.max_megapixels  # the manifest's default, for a ledger that stored no settings


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


def _make_thumbnail(src: Path, dst: Path, max_pixels: float) -> bool:
    """False when src is missing, cannot be decoded, or has more than `max_pixels` (read from the
    header: such an image is never decoded)."""
    from ..files.images import heif_support

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
