"""One pair's result as every backend hands it to the drive, and how its image gets into OUT.

A record crosses processes (from a Ray actor to the driver), so it holds bytes, not tensors, and its
error as (kind, message): PairError does not pickle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PairError

if TYPE_CHECKING:  # the record module stays torch-free: the drive and its tests need no engine
    from ..core.optimize import LogRow


@dataclass
class Record:
    """What became of one pair. `error` set: it failed, and only the loss rows may be there."""

    data: bytes | None  # the output file's bytes, for the drive to write (None: failed, or written already)
    thumb: bytes | None  # the report's thumbnail (images.thumbnail_jpeg), made where the image is
    logs: list[LogRow]  # every loss row logged, the final one last
    final: LogRow | None
    steps: int
    note: str | None  # a remark the ledger and report keep beside a done pair
    error: tuple[str, str] | None  # (kind, message)
    seconds: float | None  # compute time; None: the time since the claim (computed right after it)
    method: str = "optimize"  # what made it: optimize or network
    written_at: float | None = None  # set when the backend wrote the file itself (off the main thread)
    model: str | None = None  # method network: the recipe of the model that made it (Job.model)

    @property
    def ok(self) -> bool:
        return self.error is None


def failure(kind: str, message: str) -> Record:
    """The record of a pair that failed before anything was computed for it."""
    return Record(None, None, [], None, 0, None, (kind, message), None)


def error_of(e: BaseException) -> tuple[str, str]:
    """(kind, message) of an exception a pair ended with: a PairError's own kind, else `internal` (a bug)."""
    return (e.kind, str(e)) if isinstance(e, PairError) else ("internal", f"{type(e).__name__}: {e}")
