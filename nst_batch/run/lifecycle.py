"""What a local run does besides computing: stop cleanly on a signal, keep claims alive, tidy up.

- `Signals` turns SIGINT/SIGTERM into `Interrupted`, but only while the engine computes (a backend
  marks that span with `interruptible()`);
- `Heartbeat` keeps this worker's claims (and its registration) alive from a thread of its own;
- `remove_stale_temporaries` deletes the `.NAME.PID-TOKEN.tmp` files of writers killed mid-write.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from ..errors import EXIT_SIGINT, EXIT_SIGTERM
from ..files.layout import CONTACT_SHEET, MODELS, PREVIEWS, REPORT_HTML, SHEETS, STYLES, SUMMARY_CSV, THUMBS, thumb_path
from ..batch.ledger import Ledger
from ..files.losslog import LOSS_LOG


class Interrupted(BaseException):
    """SIGINT/SIGTERM: a BaseException so no per-pair `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


class Heartbeat:
    """Keeps this worker's claims alive from a thread of its own, with its own connection, however
    long a step takes. It beats for every pair held, from the claim until the ledger records the end."""

    def __init__(self, out: Path, worker: str, every: float):
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._beat, args=(out, worker, every), daemon=True)
        self._t.start()

    def hold(self, pair_id: int) -> None:
        with self._lock:
            self.held.add(pair_id)

    def drop(self, pair_id: int) -> None:
        with self._lock:
            self.held.discard(pair_id)

    def holding(self) -> set[int]:
        with self._lock:
            return set(self.held)

    def _beat(self, out, worker, every):
        with Ledger(out) as ledger:
            while not self._stop.wait(every):
                with self._lock:
                    ids = list(self.held)
                try:
                    ledger.worker_heartbeat(worker)  # holds the folder to this worker's settings
                    for pair_id in ids:
                        ledger.heartbeat(pair_id, worker)
                except sqlite3.Error:
                    # A busy or briefly unreachable ledger (a network filesystem): beat again next time.
                    # A thread that died here would let every claim lapse while the pairs still compute.
                    continue

    def stop(self):
        self._stop.set()
        self._t.join()


class Signals:
    """SIGINT/SIGTERM become `Interrupted`, but only while computing. During ledger bookkeeping
    (a claim just committed, a result being recorded) the signal waits until `check()`, so the
    ledger never holds a claim that nobody will release.

    Signal handlers are the process's: the one Signals installed is `Signals.active`, so a backend
    marks its computing spans (`interruptible`) without being handed the drive's object."""

    active: "Signals | None" = None

    def __init__(self):
        self.computing = False
        self.pending: int | None = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._on) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._before, Signals.active = Signals.active, self
        return self

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        Signals.active = self._before
        return False

    def _on(self, signum, frame):
        self.pending = signum  # also when raising: a library may wrap the exception in its own
        if self.computing:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)


@contextmanager
def interruptible():
    """A span where SIGINT/SIGTERM raise `Interrupted` at once (computing, training): nothing the
    ledger must hear of happens inside it."""
    s = Signals.active
    if s is None:
        yield
        return
    s.check()  # one that came before the span: it would otherwise wait for the next check
    was, s.computing = s.computing, True
    try:
        yield
    finally:
        s.computing = was


def check_signals() -> None:
    """`Interrupted` if a signal came meanwhile (one a library caught and wrapped is still a Ctrl-C)."""
    if Signals.active is not None:
        Signals.active.check()


def remove_stale_temporaries(out: Path, outputs: Iterable[str], min_age_s: float = 600.0,
                             shared: bool = False) -> int:
    """Delete `.NAME.PID-TOKEN.tmp` files left by writers killed mid-write: their process is gone, or, for a
    folder shared between machines (where a PID means nothing), they are older than any write takes.

    Only our own: the temporaries files.write_atomic makes for a file nst-batch writes (an output of
    `outputs`, the report's files and pages, a thumbnail or contact sheet, a network's checkpoint in a
    models/ folder: OUT's or a shard's) and the one older loss logs were made through. A user's
    `.notes.123.tmp` in OUT is none of these and stays.

    shared=True (a shard's run: other hosts write OUT too): the report's files and thumbnails,
    which any host may be writing, are judged by age alone; `outputs` are this worker's own to judge."""
    mine = {o for output in outputs for o in (output, thumb_path("o", output))}  # an output and its thumbnail
    ours = {*mine, LOSS_LOG, REPORT_HTML, SUMMARY_CSV, CONTACT_SHEET}
    removed = 0
    now = time.time()
    for tmp in out.rglob(".*.tmp"):
        target, _, tag = tmp.name[1:-4].rpartition(".")
        pid = tag.partition("-")[0]  # PID-TOKEN (files.write_atomic), or a bare PID (older versions)
        rel = tmp.parent.relative_to(out) / target
        if rel.parts[0] == PREVIEWS:  # a preview is a run of its own, with its own ledger: its writers are its to judge
            continue
        folder = rel.parent.as_posix()
        if not (rel.as_posix() in ours or (folder in (THUMBS, SHEETS) and target.endswith(".jpg"))
                or (folder == STYLES and target.endswith(".html"))
                or (rel.parent.name == MODELS and target.endswith(".pt"))):  # tens of MB each: weights + Adam
            continue
        try:
            old = now - tmp.stat().st_mtime > min_age_s
        except FileNotFoundError:
            continue
        by_pid = not shared or rel.as_posix() in mine
        if pid.isdigit() and (old or (by_pid and not _pid_alive(int(pid)))):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
