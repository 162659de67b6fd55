"""Atomic file writes (a crash or a full disk never leaves a truncated file under the real name), and
the names of the files nst-batch keeps in OUT besides the images and the loss log (`losslog.LOSS_LOG`)."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import PairError

LEDGER = "ledger.sqlite"  # also how the input search recognises an output folder (images.scan)
SHARDS = "shards"  # OUT/shards/K-of-N/: a shard's ledger and loss log (shards.py)
MODELS = "models"  # OUT/models/<style>.pt: the learned per-style networks (training.py)
REPORT_HTML = "report.html"
SUMMARY_CSV = "summary.csv"
CONTACT_SHEET = "contact_sheet.jpg"
THUMBS = "thumbs"
STYLES = "styles"  # the report's per-style pages
SHEETS = "contact_sheets"  # per-style contact sheets, for runs one sheet cannot show
PREVIEWS = "previews"  # OUT/previews/: `nst-batch preview`'s own inputs, ledger, outputs and pages (run/preview.py)


def thumb_path(kind: str, source: str) -> str:
    """A thumbnail's path relative to OUT: kind 'o' (an output, by its path relative to OUT), 'c' or 's'
    (a content or style image, by its path). Hashed: names are user data (any characters, any length,
    case-only differences)."""
    return f"{THUMBS}/{kind}-{hashlib.sha1(source.encode()).hexdigest()[:16]}.jpg"


def is_output_folder(folder: Path) -> bool:
    """Does `folder` hold a run's ledger: an unsharded one, or a shard's in folder/shards/K-of-N/?"""
    return (folder / LEDGER).is_file() or any((folder / SHARDS).glob(f"*-of-*/{LEDGER}"))


def write_atomic(path: Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call `write(f)` on a hidden temporary file beside `path`, fsync it, then rename it into place.

    The temporary name `.NAME.PID-TOKEN.tmp` tells `lifecycle.remove_stale_temporaries` whose it is; the
    random token keeps two hosts sharing OUT apart (every Kubernetes pod's process may be PID 1).
    durable=False skips the fsync, for caches (thumbnails) where thousands of fsyncs would dominate.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_output(path: Path, data: bytes, thumb: tuple[Path, bytes | None] | None = None) -> float:
    """An encoded image into place atomically, then its thumbnail (path, JPEG bytes), so the report never
    decodes the outputs again; the time the image got there. A refused image fails the pair as `write`;
    a refused thumbnail does not (the report makes it later)."""
    try:
        write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise PairError("write", f"cannot write {path}: {e.strerror or e}") from None
    finished = time.time()  # the pair's end: the ledger may hear of it a little later
    if thumb is not None and thumb[1] is not None:
        try:  # after the image: the thumbnail is the newer file, which the report keeps
            write_atomic(thumb[0], lambda f: f.write(thumb[1]), durable=False)  # a cache: no fsync
        except OSError:
            pass
    return finished
