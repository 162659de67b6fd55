"""Who trains a style's network: a claim file per style, OUT/models/<style>.pt.claim, held by heartbeat.

Training is claimed like a pair, but not in a ledger: shards have ledgers of their own (OUT/shards/K-of-N/),
and every shard and every worker on OUT must see one claim per style. A file beside the model is what they
all share. It is made with O_CREAT|O_EXCL (atomic on local file systems and on NFSv3 and later, whose
clients send an exclusive CREATE), holds its owner's worker id and a token, and is kept alive by touching
its mtime every lease/4 seconds. A claim whose mtime is older than the lease (its trainer was killed, its
host lost), or whose owner is a process of this host that is gone, is stale: whoever finds it renames it
away (rename is atomic everywhere, so one of two finders wins), and claims the style afresh; the new
trainer goes on from the last checkpoint. SQLite's own locking is not relied on across hosts, and
nothing here needs a lock server. mtimes are compared with this host's clock: hosts sharing OUT should
keep their clocks within a fraction of lease_s (NTP does).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

from .ledger.workers import is_dead, worker_id

SUFFIX = ".claim"


class TrainingClaim:
    """The claim on training one style's network, whose checkpoint is `model` (OUT/models/<style>.pt)."""

    def __init__(self, model: Path, lease_s: float):
        self.path = model.with_name(model.name + SUFFIX)
        self.lease_s = lease_s
        self.me = f"{worker_id()} {secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> str | None:
        """The worker holding the claim (None: none, or unreadable)."""
        try:
            return self.path.read_text().split(" ")[0] or None
        except OSError:
            return None

    def take(self) -> bool:
        """Claim the style (taking over a stale claim); True if it is now ours, with its heartbeat running."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # once as it is, once after a stale claim was moved away
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._remove_stale():
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self._stop.clear()
            self._beat = threading.Thread(target=self._beating, daemon=True, name="training-claim")
            self._beat.start()
            return True
        return False

    def stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.lease_s or is_dead(self.holder())

    def _remove_stale(self) -> bool:
        """Move a stale claim away; True if there is none now. Of two workers finding it stale, one renames
        it; the other's rename fails, or (slower still) takes the winner's fresh claim, which it puts back."""
        if not self.stale():
            return False
        aside = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            if time.time() - aside.stat().st_mtime <= self.lease_s and not is_dead(aside.read_text().split(" ")[0]):
                try:  # a live claim, made between our look and our rename: back where it was
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def _beating(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                os.utime(self.path)
            except OSError:
                pass  # moved away as stale (we were paused past the lease): the checkpoints stay consistent

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        try:
            if self.path.read_text() == self.me:
                self.path.unlink()
        except OSError:
            pass
