"""Atomic file writes: a crash or a full disk never leaves a truncated file under the real name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call `write(f)` on a hidden temporary file beside `path`, fsync it, then rename it into place.

    The temporary name `.NAME.PID.tmp` tells `runner.remove_stale_temporaries` whose it is.
    durable=False skips the fsync, for caches (thumbnails) where thousands of fsyncs would dominate.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
