"""The run loop, one for every backend: claim pairs, hand them to a backend, record what comes back.

Whatever computes the pairs (this process, Ray actors), this loop alone owns the run's state:
- claims: a batch of up to `batch` pairs of one style per call. With a backend whose slots keep caches
  of their own (`keeps_style`), a slot keeps its style while that style has pairs and a new style goes
  to a slot where no other slot works on it; otherwise pairs are taken in the ledger's order (photo by
  photo: each photo is decoded once for all its styles);
- heartbeats for every claim held, from the claim until the ledger hears of its end;
- signals: SIGINT/SIGTERM end the loop; claims not yet computed are released, outputs computed
  already are written and recorded;
- the loss log, and the record of every end: done only while this worker holds the claim under its
  recipe, with the method that made the pair (and, for a network, its model's recipe);
- faults: a slot lost while computing costs its pairs an attempt and sends them back to pending (the
  LOST_LIMIT-th loss of one pair fails it as `worker_lost`); a call only queued behind the lost one
  goes back uncounted; a call computing past `pair_timeout_s` is cancelled and counts as lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..batch.ledger import Accept, Finished, Ledger, Row
from ..batch.plan import Pair
from ..config.manifest import Settings
from ..errors import PairError
from ..files.layout import thumb_path, write_output
from ..files.losslog import LossLog, curve_record
from .backend import Backend, Event, Lost, Slot
from .jobs import Shapes
from .lifecycle import Heartbeat, Interrupted, Signals
from .progress import Display
from .record import Record

LOST_LIMIT = 3  # a pair whose slot is lost this many times under it fails as worker_lost
TICK_S = 0.5  # the longest a poll waits: how often hung calls are looked for
DEFER_S = 5.0  # a style whose network another worker trains is passed over this long, then looked at again


@dataclass
class RunResult:
    made: int = 0
    failed: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (pair name, kind, message)


@dataclass
class Work:
    """What the loop works through once the ledger is in line with the plan."""
    pairs: dict[tuple[str, str], Pair]  # (content, style) -> the plan's pair
    recipes: dict[tuple[str, str], str]  # the recipe each pair is claimed under
    only: set[int] | None  # a retry's pair ids; None: every pair
    already: int  # done before this run
    todo: int


class Books:
    """Every ledger call of the loop: claims, and each pair's end (done only while this worker still
    holds the claim under its recipe), with the heartbeat, the run's result and the display in step."""

    def __init__(self, ledger: Ledger, worker: str, work: Work, lease_s: float, display: Display, beat: Heartbeat,
                 result: RunResult):
        self.ledger, self.worker, self.work, self.lease_s = ledger, worker, work, lease_s
        self.display, self.beat, self.result = display, beat, result
        self.held: dict[int, Row] = {}  # claims not yet recorded or released

    def claim(self, style: str | None = None, accept: Accept | None = None) -> Row | None:
        row = self.ledger.claim(self.worker, self.lease_s, self.work.only, style=style, recipes=self.work.recipes,
                                accept=accept)
        if row is not None:
            self.held[row.id] = row
            self.beat.hold(row.id)
        return row

    def peek(self) -> Row | None:
        """The pair the next claim would most likely take, without claiming it."""
        return self.ledger.peek(self.work.only, self.work.recipes)

    def _let_go(self, row: Row) -> None:
        self.held.pop(row.id, None)
        self.beat.drop(row.id)

    def release(self, row: Row, started: bool = True) -> None:
        """Back to pending; started=False also takes the attempt back (the claim never began)."""
        self.ledger.release(row.id, self.worker, started=started)
        self._let_go(row)

    def failed(self, row: Row, kind: str, message: str) -> None:
        self.ledger.fail(row.id, self.worker, kind, message)
        self._let_go(row)
        name = f"{row.style} × {row.content}"
        self.result.failed += 1
        self.result.failures.append((name, kind, message))
        self.display.pair_end(name, False, time.time() - (row.started_at or time.time()), f"{kind}: {message}")

    def done(self, row: Row, rec: Record, finished_at: float) -> bool:
        """Record a pair whose image is on disk; False (and a note) when the claim had lapsed meanwhile."""
        f = rec.final
        recorded = self.ledger.done(Finished(row.id, self.worker, rec.steps, f.content, f.style, f.tv, f.total,
                                             recipe=row.recipe, note=rec.note, finished_at=finished_at,
                                             seconds=rec.seconds, curve=curve_record(rec.logs), method=rec.method,
                                             model=rec.model if rec.method == "network" else None))
        self._let_go(row)
        if not recorded:  # our lease ran out (process stopped?) and the pair was reset meanwhile
            self.display.note(f"{row.style} × {row.content}: not recorded: this worker's claim on it had lapsed "
                              "and the pair was reset; it is made again with its current recipe")
            return False
        self.result.made += 1
        took = rec.seconds if rec.seconds is not None else finished_at - (row.started_at or finished_at)
        self.display.pair_end(f"{row.style} × {row.content}", True, took, rec.note or "")
        return True


class Drive:
    """One run of the loop over one ledger. Also the backend's `Hooks` (loss rows, display)."""

    def __init__(self, ledger: Ledger, backend: Backend, display: Display, work: Work, worker: str, folder: Path,
                 settings: Settings, styles: list[str], pair_timeout_s: float | None = None):
        """`folder`: where the ledger and the loss log are (OUT, or a shard's folder); images go to
        settings.out. `styles`: the plan's styles in order (where a slot looks for a style of its own)."""
        self.ledger, self.backend, self.display, self.work, self.worker = ledger, backend, display, work, worker
        self.folder, self.s, self.styles, self.pair_timeout_s = folder, settings, styles, pair_timeout_s
        self.result = RunResult()
        self.lost: dict[int, int] = {}  # pair id -> times its slot was lost under it, in this run
        self.exhausted: set[str] = set()  # styles a claim found nothing of
        # Styles whose network another worker is training -> until when their pairs are passed over; and
        # whether the last claim took one anyway, nothing else being left (its network is then waited for).
        self.deferred: dict[str, float] = {}
        self.waiting = False
        self.streamed: set[int] = set()  # pairs whose loss rows went to the log as they came
        self.lead: int | None = None  # the pair whose steps the display shows
        self.shapes = Shapes(settings.size, settings.bucket)

    def run(self) -> RunResult:
        self.loss_log = LossLog(self.folder)
        self.beat = Heartbeat(self.folder, self.worker, every=max(1.0, self.s.lease_s / 4))
        self.books = Books(self.ledger, self.worker, self.work, self.s.lease_s, self.display, self.beat, self.result)
        self.display.start(self.work.already + self.work.todo, self.work.already)
        try:
            with Signals() as signals:
                self.backend.start(self)
                self._loop(signals)
        finally:
            self.beat.stop()
            self.backend.close()
            self.display.close()
            self.loss_log.close()
        return self.result

    def _loop(self, signals: Signals) -> None:
        try:
            while True:
                signals.check()
                if self._fill() and self.backend.looks_ahead and (nxt := self.books.peek()) is not None:
                    self.backend.ahead(nxt)
                signals.check()  # after the claims: a signal that came meanwhile releases them
                if not self.books.held and (any(s.ready for s in self.backend.slots) or self.books.peek() is None):
                    return  # a slot that could take a pair found none, or none is left
                self._record(self.backend.poll(TICK_S))
                self._hung(time.time())
        except BaseException as e:
            try:
                self._record(self.backend.drain())  # outputs computed already are kept, even on Ctrl-C
            finally:
                if isinstance(e, Interrupted):
                    for row in list(self.books.held.values()):
                        self.books.release(row)
            raise

    def _fill(self) -> bool:
        """Give every slot that has room a call of claimed pairs; whether any was given."""
        given = False
        for slot in self.backend.slots:
            while slot.ready and slot.calls < self.backend.queue and (rows := self._claim_for(slot)):
                self.backend.submit(slot, rows)
                given = True
        return given

    def _claim_for(self, slot: Slot) -> list[Row]:
        """Up to `batch` pairs of one style: with style affinity, the slot's own style first (its targets
        are cached), then one no other slot works on, then any."""
        claim, first = self.books.claim, None
        if self.backend.keeps_style:
            # A style whose network is being trained is passed over here too (the fallback below may wait on it).
            put_off = self._put_off()
            first = claim(slot.style) if slot.style is not None and slot.style not in put_off else None
            if first is None:
                taken = {o.style for o in self.backend.slots if o is not slot}
                for st in self.styles:
                    if st not in taken and st not in self.exhausted and st not in put_off:
                        first = claim(st)
                        if first is not None:
                            break
                        self.exhausted.add(st)  # only a lapsed claim can bring it back, and claim() finds that
        if first is None:
            first = self._claim_not_deferred()
        if first is None:
            return []
        rows, most = [first], self.backend.most_per_call(self.s)
        # The rest of the batch: pairs of its style whose photo has the first one's working shape, so the
        # engine launches it as one batch, not one per shape.
        same = self.shapes.like(first.content_path) if most > 1 else None
        while len(rows) < most and (r := claim(first.style, same)):
            rows.append(r)
        slot.style = first.style
        return rows

    def _put_off(self) -> set[str]:
        """Styles whose network another worker is training, passed over until their DEFER_S is up."""
        now = time.monotonic()
        return {st for st, until in self.deferred.items() if until > now}

    def _claim_not_deferred(self) -> Row | None:
        """The next pair in the ledger's order, passing over styles whose network is being trained elsewhere
        (checked again after DEFER_S), unless nothing else is left: then one of theirs, to wait with."""
        put_off = self._put_off()
        self.waiting = False
        if not put_off:
            return self.books.claim()
        for st in self.styles:
            if st not in put_off and (row := self.books.claim(st)) is not None:
                return row
        self.waiting = True
        return self.books.claim()

    def _record(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Lost):
                self._lost(e)
            else:
                for row, rec in zip(e.rows, e.records):
                    self._finished(row, rec)

    def _finished(self, row: Row, rec: Record) -> None:
        if row.id in self.streamed:
            self.streamed.discard(row.id)
        else:
            self.loss_log.write(row, row.attempts, rec.logs)
        if rec.error is not None:  # this pair failed; the others of its call go on
            self.books.failed(row, *rec.error)
            return
        finished_at = rec.written_at
        if finished_at is None:
            out = self.s.out
            try:
                finished_at = write_output(out / row.output, rec.data, (out / thumb_path("o", row.output), rec.thumb))
            except PairError as e:
                self.books.failed(row, e.kind, str(e))
                return
        self.books.done(row, rec, finished_at)

    def _lost(self, e: Lost) -> None:
        e.slot.style = None  # whatever it had cached is gone with it
        for row in e.rows:
            self.streamed.discard(row.id)
            if not e.computing:  # queued behind the lost call: it never began
                self.books.release(row, started=False)
                continue
            n = self.lost[row.id] = self.lost.get(row.id, 0) + 1
            if n >= LOST_LIMIT:
                self.books.failed(row, "worker_lost", self.backend.lost_text(n, e.why))
            else:
                self.books.release(row)

    def _hung(self, now: float) -> None:
        if self.pair_timeout_s is None:
            return
        for slot in self.backend.slots:
            if slot.busy_since is not None and now - slot.busy_since > self.pair_timeout_s:
                self.backend.cancel(slot, f"no answer in pair_timeout_s={self.pair_timeout_s:g} s, killed")

    # -- Hooks: what a backend reports while it computes --------------------------------------------

    def write(self, pair, attempt: int, rows) -> None:
        self.loss_log.write(pair, attempt, rows)

    def logged(self, row: Row, log) -> None:
        self.loss_log.write(row, row.attempts, [log])
        self.streamed.add(row.id)
        if row.id == self.lead:
            self.display.step(log.step, log.total)

    def started(self, rows: list[Row], steps: int) -> None:
        self.lead = rows[0].id
        self.display.pair_start(" + ".join(f"{r.style} × {r.content}" for r in rows), steps)

    def note(self, message: str) -> None:
        self.display.note(message)

    def defer(self, style: str) -> None:
        self.deferred[style] = time.monotonic() + DEFER_S

    def may_wait(self, style: str) -> bool:
        return self.waiting
