"""Input hashes (table files), for plan.HashCache: a file whose size and mtime are unchanged keeps its
hash, so a resumed run over 10,000 unchanged photos reads none of them again."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from ...errors import ConfigError
from .connection import FILENAME, Connection


class Hashes(Connection):
    @staticmethod
    def stored_hashes(out: Path) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, hash) as the last plan on `out` found them; empty without a
        ledger or with one from before schema 3. Read before planning, so a bad manifest never
        creates OUT."""
        if not (out / FILENAME).is_file():
            return {}
        try:
            led = Connection(out, readonly=True)
        except ConfigError:
            return {}  # a ledger from a newer nst-batch, or no ledger at all: opening it for the run says so
        try:
            if not led.db.execute("SELECT 1 FROM sqlite_master WHERE name='files'").fetchone():
                return {}
            return {p: (size, mtime, h) for p, size, mtime, h in
                    led.db.execute("SELECT path, size, mtime_ns, hash FROM files")}
        finally:
            led.close()

    def store_hashes(self, put: Mapping[str, tuple[int, int, str]], forget: Iterable[str] = ()) -> None:
        """Write plan.HashCache.changes(): new or changed files, files no longer in the plan."""
        forget = [(p,) for p in forget]
        if not put and not forget:
            return  # an unchanged collection: no write, no lock
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                                [(p, *v) for p, v in put.items()])
            self.db.executemany("DELETE FROM files WHERE path=?", forget)
