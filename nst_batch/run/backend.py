"""What computes the pairs, as the drive sees it: slots that take claimed pairs and report back.

The drive (run/drive.py) owns every piece of state a run has: claims, heartbeats, signals, the loss
log, the ledger's records and the fault logic. A backend only computes: it is handed a slot's pairs
(`submit`), says what became of them (`poll` -> events), stops a slot that hangs (`cancel`), and
says, through its slots, which can take pairs and since when one computes. The local backend
(run/local.py) computes in this process; the Ray backend (run/ray.py) on actors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Protocol, Union

from ..batch.ledger import Row
from .record import Record, failure


@dataclass(eq=False)
class Slot:
    """One place pairs are computed (the local engine, one Ray actor)."""

    name: str
    style: str | None = None  # the drive's: the style it keeps while that style has pairs (cached targets)
    ready: bool = True  # the backend's: takes pairs now (False: restarting)
    calls: int = 0  # the backend's: calls submitted and still taking room (computing or queued)
    busy_since: float | None = None  # the backend's: when its current call began computing; None: not known


@dataclass
class Returned:
    """Calls over: one record per row, in order (a record with an error fails its pair alone)."""

    slot: Slot
    rows: list[Row]
    records: list[Record]


@dataclass
class Lost:
    """Rows whose slot was lost (died, killed): `computing`, or only queued behind the call that was."""

    slot: Slot
    rows: list[Row]
    computing: bool
    why: str


Event = Union[Returned, Lost]


def failed(slot: Slot, rows: list[Row], kind: str, message: str) -> Returned:
    """A whole call that ended in an error: each of its pairs fails with it."""
    return Returned(slot, rows, [failure(kind, message) for _ in rows])


class Hooks(Protocol):
    """What the drive offers a backend while it computes."""

    def write(self, pair, attempt: int, rows: Iterable) -> None:
        """Loss rows straight into the loss log (LossLog.write's arguments): a network's training curve."""

    def logged(self, row: Row, log) -> None:
        """A pair's loss row as it is computed: into the loss log at once (its record's rows are then not
        written again), and the display's step."""

    def started(self, rows: list[Row], steps: int) -> None:
        """A call begins computing: the display's current pairs and their steps."""

    def note(self, message: str) -> None:
        """A line for the user."""

    def defer(self, style: str) -> None:
        """Another worker trains this style's network: its pairs (released uncounted) wait while others are left."""

    def may_wait(self, style: str) -> bool:
        """Whether a pair of `style` may wait for its network trained elsewhere: nothing else was left to claim."""


class Backend(ABC):
    """Computes claimed pairs; owns no ledger state. Subclasses set `slots` (and `queue`, `keeps_style`)."""

    slots: list[Slot]
    queue: int = 1  # calls a slot holds at once: the one computing and those queued behind it
    keeps_style: bool = True  # each slot keeps a style (per-slot caches); False: one claim order for all
    looks_ahead: bool = False  # `ahead` is worth a ledger look (it prefetches)
    hooks: Hooks

    def start(self, hooks: Hooks) -> None:
        """Called once by the drive before the first submit."""
        self.hooks = hooks

    def most_per_call(self, settings) -> int:
        """The most pairs (of one style) the drive claims for one call: `batch`, or for `batch: auto`
        settings.AUTO_BATCH_MAX (each slot's engine then batches what fits, per shape)."""
        return settings.most_per_batch()

    @abstractmethod
    def submit(self, slot: Slot, rows: list[Row]) -> None:
        """Compute these claimed pairs (of one style) on this slot, after its calls before."""

    def ahead(self, row: Row) -> None:
        """The pair the next claim will most likely take (for a look-ahead decode)."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """What became of submitted pairs since the last poll: waits up to `timeout` for something."""

    @abstractmethod
    def cancel(self, slot: Slot, why: str) -> None:
        """Stop a slot's calls (one hangs): the next poll reports them Lost, with `why`."""

    def drain(self) -> list[Event]:
        """On the way out (Ctrl-C, an error): the events of calls already computed, whose outputs are
        worth keeping; calls not computed yet are dropped (the drive releases their claims)."""
        return []

    def close(self) -> None:
        """Let go of what the backend holds (threads); the drive calls it last."""

    def lost_text(self, times: int, why: str) -> str:
        """The worker_lost message of a pair lost `times` times."""
        return f"its worker was lost {times} times (last: {why})"
