"""One open ledger file: how it is opened (journal mode, migration, read-only), its transactions, and
the settings of the last run kept in table meta. The base of every part of `Ledger`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...files.layout import LEDGER, SHARDS
from .schema import SCHEMA_VERSION, migrate

FILENAME = LEDGER


class Connection:
    def __init__(self, out: Path, create: bool = True, readonly: bool = False):
        self.path = out / FILENAME
        if (readonly or not create) and not self.path.is_file():
            raise ConfigError(f"no run ledger in {out} (expected {self.path}); run 'nst-batch run' first")
        if readonly:
            self._open_readonly()
            return
        out.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves, so each is explicit and short.
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # Decided by where the file is, so every opener (a worker, its heartbeat thread) agrees.
        self.shard_ledger = out.parent.name == SHARDS
        try:
            if self.shard_ledger:
                self.db.execute("PRAGMA journal_mode=DELETE")
                self.db.execute("PRAGMA synchronous=FULL")  # NORMAL can lose a commit in rollback mode
            else:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            migrate(self.db, self.path)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise ConfigError(f"{self.path}: not a usable ledger ({e}); move it away to start afresh") from None

    def _open_readonly(self) -> None:
        """For `status` and `report`: no migration and no journal-mode change, so no write lock to
        wait for (or to hold) while workers claim pairs."""
        self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                  isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            version = int(self.get_meta("schema_version", 0))
        except (sqlite3.DatabaseError, ValueError) as e:
            self.db.close()
            raise ConfigError(f"{self.path}: not a usable ledger ({e}); move it away to start afresh") from None
        if not 0 < version <= SCHEMA_VERSION:
            self.db.close()
            raise ConfigError(f"{self.path}: schema {version}, this nst-batch knows {SCHEMA_VERSION}; "
                              "use the nst-batch that wrote it")

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    # -- settings of the last run, for `retry` and the report -------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def store_settings(self, settings: dict[str, Any]) -> None:
        """The manifest's settings of the last `run` (Settings.to_dict, folders absolute): `retry` re-runs
        failed pairs with them, the report shows them. The one writer; `stored_settings` the one reader."""
        self.set_meta("settings", settings)

    def stored_settings(self) -> dict[str, Any]:
        value = self.get_meta("settings")
        return value if isinstance(value, dict) else {}


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so two workers never race a claim."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
