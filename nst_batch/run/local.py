"""The local backend: the pairs computed in this process, on its one engine (`nst-batch run`).

The next photo (with batches: the next call's photos, a call being queued behind the one computing) is
decoded on threads while the engine computes, and each output is encoded and written on a thread behind
it (files/stage.py's IOStage); a network pair's style network is trained or
loaded first (`training.Trainer`). Every call into the engine is in `compute`; the loop around it is
the drive's (run/drive.py), the set-up the session's.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Sequence

from ..batch.ledger import Ledger, Row
from ..batch.methods import StyleMethod
from ..batch.plan import Pair
from ..batch.shards import Shard, check_layout
from ..config.manifest import Settings
from ..core.engine import Engine, Made
from ..files.decode import PhotoMeta
from ..files.layout import thumb_path
from ..files.stage import IOStage, StyleImages
from . import training
from .backend import Backend, Event, Hooks, Lost, Returned, Slot
from .drive import RunResult, Work
from .lifecycle import check_signals, interruptible
from .progress import Display
from .jobs import job_for, note_for
from .record import Record, error_of, failure
from .session import plan_for, work_through


def run(settings: Settings, display: Display, only_failed_kinds: list[str] | None = None,
        retry: bool = False, shards: Sequence[Shard | None] = (None,)) -> RunResult:
    """Make every pair of the plan that is not done yet. With retry=True, only the failed ones.

    `shards`: the ledgers to work through, one after the other: None is OUT's own (an unsharded
    run), a Shard is that shard's ledger and its pairs only (`--shard K/N`; a plain `retry` of a
    sharded folder passes all of them). The model is loaded and the inputs planned once for all."""
    for shard in shards:  # first: a layout mistake costs no model load and no hashing
        check_layout(settings.out, shard)
    # The model and device first: a weights typo must fail before the ledger is touched, or the
    # recipe change it implies would send every finished pair back to pending.
    engine = Engine(settings, style_pixels=StyleImages(settings.max_megapixels))
    # The engine resolved precision for its device (auto: bf16 on CUDA, fp32 elsewhere): the recipe records that.
    resolved = engine.settings
    plan, hashes = plan_for(resolved, shards)

    def backend(ledger: Ledger, folder: Path, work: Work, styles: dict, methods: dict) -> Backend:
        return LocalBackend(engine, folder, ledger, work.pairs, styles, methods)

    result = RunResult()
    for shard in shards:
        got = work_through(settings, resolved, plan, hashes, display, backend, where=str(engine.device),
                           device_type=engine.device.type, only_failed_kinds=only_failed_kinds, retry=retry,
                           shard=shard)
        result.made += got.made
        result.failed += got.failed
        result.failures += got.failures
    return result


def record_of(m: Made, data: bytes | None = None, thumb: bytes | None = None, seconds: float | None = None,
              written_at: float | None = None) -> Record:
    """The engine's result for one job as the drive records it (the Ray actor sends the same)."""
    return Record(data, thumb, m.logs, m.final, m.steps, m.note, None if m.ok else (m.error.kind, str(m.error)),
                  seconds, m.job.method, written_at, m.job.model)


def compute(engine: Engine, trainer: training.Trainer, io: IOStage, rows: list[Row],
            pairs: dict[tuple[str, str], Pair], upcoming: list[Row],
            hooks: Hooks) -> list[tuple[Made | Exception, PhotoMeta | None]]:
    """One call's pairs through the engine: each photo decoded (on the I/O threads when prefetched; a bad
    one fails its pair alone), a network pair's network trained or loaded, the `upcoming` pairs' photos
    prefetched, then the batch made. What became of each row, in order: the engine's Made, or the error it failed with,
    and what decoding said of its photo."""
    ends: dict[int, Made | Exception] = {}
    metas: dict[int, PhotoMeta] = {}
    jobs, kept = [], []
    for r in rows:
        try:
            photo, metas[r.id] = io.photo(r.content_path)
            job = trainer.job(job_for(r, pairs.get((r.content, r.style)), photo, engine.style_pixels))
            if job.method == "network":  # trained (with checkpoints) or loaded, once per style
                with interruptible():  # Ctrl-C stops training at once: the checkpoint stays
                    trainer.ensure(job, wait=hooks.may_wait(job.style))
            jobs.append(job)
            kept.append(r)
        except Exception as e:
            ends[r.id] = e
    if upcoming:  # decoded on the I/O threads while this batch computes
        io.prefetch(*(r.content_path for r in upcoming))
    if jobs:
        by_job = dict(zip(jobs, kept))
        cfg = engine.optim_for(jobs[0])  # its style's steps, or a network's refine_steps
        hooks.started(kept, cfg.steps * len(cfg.scales))
        with interruptible():
            made = engine.make(jobs, lambda j, lr: hooks.logged(by_job[j], lr), hooks.note)
        if any(not m.ok for m in made):
            check_signals()  # an Interrupted that a library wrapped is still a Ctrl-C
        ends.update((r.id, m) for r, m in zip(kept, made))
    return [(ends[r.id], metas.get(r.id)) for r in rows]


class LocalBackend(Backend):
    """One slot, this process's engine: `poll` computes the call submitted, synchronously, and reports
    what the I/O thread has written meanwhile. Its engine caches every style, so pairs go photo by photo."""

    keeps_style = False
    looks_ahead = True

    def __init__(self, engine: Engine, folder: Path, ledger: Ledger, pairs: dict[tuple[str, str], Pair],
                 styles: dict[str, StyleMethod], methods: dict[tuple[str, str], str]):
        self.engine, self.folder, self.ledger, self.pairs = engine, folder, ledger, pairs
        self.networks = (styles, methods)
        self.slots = [Slot(str(engine.device))]
        self.calls: deque[list[Row]] = deque()
        self.upcoming: Row | None = None
        self.io = IOStage(engine.settings.size, engine.settings.max_megapixels)
        # With batches (a GPU), a second call is claimed and queued while one computes, so its photos are
        # decoded meanwhile: one look-ahead photo would leave the rest of a batch of 64 to decode between
        # launches. Pair by pair (a CPU), one call at a time and the next pair's photo looked ahead.
        self.queue = 2 if self.most_per_call(engine.settings) > 1 else 1

    def start(self, hooks: Hooks) -> None:
        super().start(hooks)
        # The drive is the training curve's loss log and its notes' display too.
        self.trainer = training.Trainer(self.folder, self.ledger, self.engine, *self.networks, hooks, hooks.note)

    def most_per_call(self, settings) -> int:
        """`batch: auto` on this engine's device: up to DeviceConfig.auto_batch_max (1 on a CPU), so a CPU
        worker does not hold 64 claims it makes one by one while other workers could take them."""
        if settings.batch == "auto":
            return self.engine.config.auto_batch_max
        return super().most_per_call(settings)

    def submit(self, slot: Slot, rows: list[Row]) -> None:
        self.calls.append(rows)
        slot.calls = len(self.calls)

    def ahead(self, row: Row) -> None:
        self.upcoming = row

    def poll(self, timeout: float) -> list[Event]:
        slot, s = self.slots[0], self.engine.settings
        events: list[Event] = []
        rows = self.calls.popleft() if self.calls else None
        upcoming = self.calls[0] if self.calls else [self.upcoming] if self.upcoming else []
        self.upcoming = None
        if rows is not None:
            try:
                ends = compute(self.engine, self.trainer, self.io, rows, self.pairs, upcoming, self.hooks)
            finally:
                slot.calls = len(self.calls)
            for r, (end, meta) in zip(rows, ends):
                if isinstance(end, training.TrainingElsewhere):  # back to pending, uncounted; others first
                    self.hooks.defer(r.style)
                    events.append(Lost(slot, [r], False, str(end)))
                elif isinstance(end, Exception):
                    events.append(Returned(slot, [r], [failure(*error_of(end))]))
                elif not end.ok:  # this pair failed; the others of its batch go on
                    events.append(Returned(slot, [r], [record_of(end)]))
                else:
                    end.note = note_for(end, meta, self.engine.style_pixels)
                    self.io.write((r, end), end.image, meta, s, s.out / r.output, s.out / thumb_path("o", r.output))
        # Nothing computed this time: the run waits for the files still being written.
        return events + self._written(wait=rows is None)

    def _written(self, wait: bool) -> list[Event]:
        slot = self.slots[0]
        return [Returned(slot, [r], [failure(*error_of(error)) if error is not None
                                     else record_of(made, written_at=finished_at)])
                for (r, made), error, finished_at in self.io.finished(wait)]

    def cancel(self, slot: Slot, why: str) -> None:
        pass  # a call computes inside poll, so none is ever found hung

    def drain(self) -> list[Event]:
        self.calls.clear()
        return self._written(wait=True)  # computed outputs are worth their files

    def close(self) -> None:
        self.io.close()
