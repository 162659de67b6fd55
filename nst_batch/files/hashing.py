"""Content hashes of input files, and a cache that reads a file again only when its size or mtime changed."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Mapping


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:  # unreadable files still get a pair; it fails with a reason when run
        return f"unreadable:{e.errno}"
    return h.hexdigest()


Known = Mapping[str, tuple[int, int, str]]  # absolute path -> (size, mtime_ns, hash) of an earlier plan
# A file changed again within its mtime's granularity (2 s on FAT) after being hashed would keep its
# size and mtime: hashes of files this young are used but never kept (git's "racily clean" rule).
RACY_NS = 2_000_000_000


class HashCache:
    """file -> hash, read from disk only when its (size, mtime_ns) differ from those `known` from an
    earlier plan (the ledger keeps them). Like make and rsync, an edit that keeps both is not seen.

    Call it as make_plan's `hashes`; then `changes()` says what to store for the next plan."""

    def __init__(self, known: Known | None = None, read: Callable[[Path], str] = file_hash):
        self.known = dict(known or {})
        self.read = read
        self.seen: dict[str, tuple[int, int, str]] = {}  # what to keep: files of this plan, not too young
        self._young_after = time.time_ns() - RACY_NS

    def __call__(self, path: Path) -> str:
        key = str(path)
        try:
            st = os.stat(path)  # before reading: a change after it shows as a new mtime next time
        except OSError:
            return self.read(path)
        sig = (st.st_size, st.st_mtime_ns)
        old = self.known.get(key)
        h = old[2] if old is not None and (old[0], old[1]) == sig else self.read(path)
        # An unreadable file may become readable by chmod, which leaves mtime alone: never kept.
        if not h.startswith("unreadable:") and st.st_mtime_ns < self._young_after:
            self.seen[key] = (*sig, h)
        return h

    def changes(self) -> tuple[dict[str, tuple[int, int, str]], list[str]]:
        """(entries to write, paths to forget): nothing at all when no file changed."""
        put = {k: v for k, v in self.seen.items() if self.known.get(k) != v}
        return put, [k for k in self.known if k not in self.seen]
