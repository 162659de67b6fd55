"""thumbs/: 240 px JPEGs of every output and source image, for the pages and the contact sheets.

The run writes an output's own from the image in memory (encode.write_thumbnail); the report makes
any that is missing or older than its image (older runs), so re-running the report on a big run is quick.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..batch.ledger import Row
from ..config.manifest import Settings
from ..files.encode import THUMB_PX, shrink
from ..files.layout import THUMBS, thumb_path
from . import parallel

MAX_MEGAPIXELS = Settings.max_megapixels  # the manifest's default, for a ledger that stored no settings
PROCESSES_FROM = 2000  # thumbnails to make: from this many they are made in worker processes


@dataclass(frozen=True)
class Thumbs:
    """Thumbnail paths relative to OUT; a missing key means no preview (no output yet, or undecodable).
    An output's may be the output itself (a user's name: links to it are percent-encoded)."""
    content: dict[str, str]
    style: dict[str, str]
    output: dict[int, str]  # by ledger row id


def _fresh(src: str, dst: str) -> bool | None:
    """True: dst is there and not older than src; False: it is to be made; None: no src."""
    try:
        src_mtime = os.stat(src).st_mtime
    except OSError:
        return None
    try:
        return os.stat(dst).st_mtime >= src_mtime
    except FileNotFoundError:
        return False


_TOKEN = None  # this process's part of a temporary name (layout.write_atomic's form)


def _write_cache(dst: str, data: bytes) -> None:
    """write_atomic without the fsync, the parent mkdir and a random token per file: a thumbnail is a
    cache, thumbs/ exists, and each name is written by one thread only. A crash leaves a temporary
    (lifecycle removes those), never a cut thumbnail that later reports would take as fresh."""
    global _TOKEN
    if _TOKEN is None:
        _TOKEN = f"{os.getpid()}-{secrets.token_hex(4)}"
    head, name = os.path.split(dst)
    tmp = os.path.join(head, f".{name}.{_TOKEN}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _make_thumbnail(src: str, dst: str, max_pixels: float) -> bool:
    """False when src is missing, cannot be decoded, or has more than `max_pixels` (read from the
    header: such an image is never decoded)."""
    try:
        with Image.open(src) as im:  # reads the header only
            if im.width * im.height > max_pixels:
                return False
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a fraction of full size, much faster
            rgb = shrink(im)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=85)
    except Exception:  # Pillow raises many kinds for bad files; any of them means "no preview"
        return False
    _write_cache(dst, buf.getvalue())
    return True


def _make_batch(jobs: list[tuple[str, str, float]]) -> list[bool]:
    """_make_thumbnail of each job. Our own limit (max_pixels) is the one that counts: Pillow's
    DecompressionBombWarning is silenced around the whole batch, not once per image."""
    from ..files.decode import heif_support

    heif_support()  # HEIC sources get a preview too, when the run could read them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return [_make_thumbnail(*job) for job in jobs]


def _run_batches(jobs: list[tuple[str, str, float]]) -> list[bool]:
    """Every job, on every core. Pillow releases the GIL while it decodes, resizes and encodes, but a
    small image costs more in Python (opening, header parsing, saving) than in those: thousands of
    them go to forked worker processes (parallel.py says when that is safe), a few to threads."""
    n = parallel.workers()
    if len(jobs) >= PROCESSES_FROM and parallel.can_fork():
        size = max(64, min(2048, len(jobs) // (n * 8)))
        return [ok for part in parallel.fork_map(_make_batch, [jobs[i:i + size] for i in range(0, len(jobs), size)])
                for ok in part]
    with ThreadPoolExecutor(max_workers=n) as pool:
        done = list(pool.map(_make_batch, [jobs[i::n] for i in range(n)]))
    got = [False] * len(jobs)
    for i, part in enumerate(done):
        got[i::n] = part
    return got


_PNG = b"\x89PNG\r\n\x1a\n"


def _small_png(path: str) -> bool:
    """Is `path` a PNG no larger than a thumbnail? Its first 24 bytes say (IHDR: width, height)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return False
    if len(head) < 24 or head[:8] != _PNG or head[12:16] != b"IHDR":
        return False
    return max(struct.unpack(">II", head[16:24])) <= THUMB_PX


def _own_thumbnails(candidates: dict[int, tuple[str, str]]) -> dict[int, str]:
    """id -> output (relative to OUT) of the candidates (id -> (output, its path)) that are small PNGs.
    Read by threads: 200,000 small reads wait on the disk, not on the GIL."""
    ids = list(candidates)
    chunks = [ids[i:i + 1000] for i in range(0, len(ids), 1000)]  # a future each chunk, not each file
    with ThreadPoolExecutor(max_workers=8) as pool:
        small = pool.map(lambda chunk: [i for i in chunk if _small_png(candidates[i][1])], chunks)
        return {i: candidates[i][0] for part in small for i in part}


def make_thumbnails(out: Path, rows: list[Row], on_disk: set[int], max_megapixels: float = MAX_MEGAPIXELS) -> Thumbs:
    """Thumbnails of every source and of every output on disk (`on_disk`: their ids), made only where
    missing or older than their image (a run writes an output's own as it writes the output). A
    source over the run's max_megapixels (a pair the run failed as too_large) gets none: decoding it,
    on every core at once, is what the limit prevents."""
    (out / THUMBS).mkdir(exist_ok=True)
    content, style, output = {}, {}, {}
    for r in rows:  # a photo's and a style's name hashed once, not once a pair
        if r.content not in content:
            content[r.content] = thumb_path("c", r.content_path)
        if r.style not in style:
            style[r.style] = thumb_path("s", r.style_path)
        if r.id in on_disk:
            output[r.id] = thumb_path("o", r.output)
    limit = max_megapixels * 1e6
    root = str(out)
    sources = {content[r.content]: (r.content_path, limit) for r in rows}
    sources |= {style[r.style]: (r.style_path, limit) for r in rows}
    # Outputs: this run's own files, as large as 'size' makes them (the limit is about inputs).
    sources |= {output[r.id]: (os.path.join(root, r.output), float("inf")) for r in rows if r.id in output}
    # One listing of thumbs/ says which exist: only those have dates to compare (two stats each). At
    # 200,000 pairs nearly all are fresh in a report run again, and none there in a first one.
    with os.scandir(out / THUMBS) as it:
        there = {f"{THUMBS}/{e.name}" for e in it}
    ok = {name: _fresh(src, os.path.join(root, name)) if name in there else False
          for name, (src, _) in sources.items()}
    # An output with no thumbnail that already fits one (a PNG of a run at 'size' 240 or less) is shown
    # as it is: re-encoding it would give the same pixels, 200,000 times over in a small-size collection.
    own = _own_thumbnails({r.id: (r.output, sources[output[r.id]][0]) for r in rows
                           if r.id in output and ok[output[r.id]] is False})
    skip = {output[i] for i in own}
    todo = [name for name, fresh in ok.items() if fresh is False and name not in skip]
    ok |= dict(zip(todo, _run_batches([(sources[n][0], os.path.join(root, n), sources[n][1]) for n in todo])))
    found = Thumbs(*({k: name for k, name in d.items() if ok[name]} for d in (content, style, output)))
    found.output.update(own)
    return found
