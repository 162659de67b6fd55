"""The local driver of a run: plan -> ledger -> engine -> outputs and loss log.

`run` claims pairs from the ledger (one at a time, or `batch` of one style) until none is left, so
any number of processes can share an output folder; it decodes the next photo on a thread while the
engine computes, hands the claimed pairs to `engine.Engine.make`, writes each image and its loss
rows, and records every outcome; one bad pair never stops the others. Signals, heartbeats and
temporary-file cleanup are `lifecycle`'s. What any driver does around the engine (plan and ledger
set-up: `plan_for`, `prepare`; a pair's job: `jobs.job_for`; recording an end: `Books`) is here
too, and `cluster`'s Ray driver calls the same functions.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import training
from ..core.engine import Engine, Job
from ..errors import ConfigError, PairError
from ..files.layout import thumb_path
from ..files.stage import IOStage, StyleImages
from .jobs import job_for, note_for
from ..batch.ledger import Finished, Ledger, Row, worker_id
from .lifecycle import Heartbeat, Interrupted, Signals, remove_stale_temporaries
from ..files.losslog import LossLog, curve_record
from ..config.manifest import Settings
from ..files.names import skipped_line
from ..core.optimize import LogRow
from ..files.hashing import HashCache
from ..batch.plan import Pair, Plan, make_plan, recipe_settings
from ..batch.shards import Shard, check_layout, claim_layout
from .progress import Display


@dataclass
class RunResult:
    made: int = 0
    failed: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (pair name, kind, message)


def run(settings: Settings, display: Display, only_failed_kinds: list[str] | None = None,
        retry: bool = False, shards: Sequence[Shard | None] = (None,)) -> RunResult:
    """Make every pair of the plan that is not done yet. With retry=True, only the failed ones.

    `shards`: the ledgers to work through, one after the other: None is OUT's own (an unsharded
    run), a Shard is that shard's ledger and its pairs only (`--shard K/N`; a plain `retry` of a
    sharded folder passes all of them). The model is loaded and the inputs planned once for all."""
    out = settings.out
    for shard in shards:  # first: a layout mistake costs no model load and no hashing
        check_layout(out, shard)
    # The model and device first: a weights typo must fail before the ledger is touched, or the
    # recipe change it implies would send every finished pair back to pending.
    engine = Engine(settings, style_pixels=StyleImages(settings.max_megapixels))
    # The engine resolved precision for its device (auto: bf16 on CUDA, fp32 elsewhere): the recipe records that.
    resolved = engine.settings
    plan, hashes = plan_for(resolved, shards)
    result = RunResult()
    for shard in shards:
        got = _run_ledger(settings, engine, plan, hashes, display, only_failed_kinds, retry, shard)
        result.made += got.made
        result.failed += got.failed
        result.failures += got.failures
    return result


def _only_for(settings: Settings, shards: Sequence[Shard | None], hashes: HashCache):
    """The hash function for the plan: `hashes` itself, or, sharded, one that reads only the inputs of
    the shards' own pairs (found by a first plan that reads no file). Each of 64 array tasks
    would otherwise read the whole collection from shared storage on its first start; a pair of
    another shard gets a placeholder recipe, and is dropped from this run's plan anyway."""
    if any(s is None for s in shards):
        return hashes
    names = make_plan(settings, lambda path: "")
    needed = {str(x) for p in names if any(s.owns(p.content, p.style) for s in shards)
              for x in (p.content_path, p.style_path, *(m.path for m in p.members))}
    return lambda path: hashes(path) if str(path) in needed else "not-this-shard"


def _run_ledger(settings: Settings, engine: Engine, plan: Plan, hashes: HashCache, display: Display,
                only_failed_kinds: list[str] | None, retry: bool, shard: Shard | None) -> RunResult:
    out = settings.out
    if shard is not None:
        plan = Plan([p for p in plan if shard.owns(p.content, p.style)], plan.skipped)
    # A retry needs the ledger there already; a run makes the shard's folder (refusing another count).
    folder = (shard.folder(out) if shard is not None else out) if retry else claim_layout(out, shard)
    worker = worker_id()
    with Ledger(folder, create=not retry) as ledger:
        if shard is not None:
            _one_host(ledger, display, shard)
        try:
            # Issue 13: which pairs a style's network makes (their recipes include its model's).
            plan, styles, methods = training.assign(plan, engine.settings, ledger.done_recipes(), engine.device.type)
            work = prepare(ledger, settings, engine.settings, plan, hashes, worker, display, only_failed_kinds,
                           retry, str(engine.device), shard)
            if work is None:
                return RunResult()
            for sm in styles.values():
                if sm.pending or sm.method == "network" and settings.method != "auto":
                    display.note(training.choice_line(sm, engine.settings, engine.device.type))
            return _work(ledger, engine, display, work, worker, folder, (styles, methods))
        finally:
            ledger.unregister(worker)


def plan_for(resolved: Settings, shards: Sequence[Shard | None] = (None,)) -> tuple[Plan, HashCache]:
    """The plan of a run with these resolved settings, reading only the inputs changed since the last
    plan on OUT (sharded: only those of the shards' own pairs); OUT is created once the plan stands
    (a bad folder never creates it)."""
    first = shards[0].folder(resolved.out) if shards[0] is not None else resolved.out
    hashes = HashCache(Ledger.stored_hashes(first))  # inputs unchanged since the last plan are not read
    plan = make_plan(resolved, _only_for(resolved, shards, hashes))
    resolved.out.mkdir(parents=True, exist_ok=True)
    return plan, hashes


@dataclass
class Work:
    """What a driver works through once the ledger is in line with the plan."""
    pairs: dict[tuple[str, str], Pair]  # (content, style) -> the plan's pair
    recipes: dict[tuple[str, str], str]  # the recipe each pair is claimed under
    only: set[int] | None  # a retry's pair ids; None: every pair
    already: int  # done before this run
    todo: int


def prepare(ledger: Ledger, settings: Settings, resolved: Settings, plan: Plan, hashes: HashCache, worker: str,
            display: Display, only_failed_kinds: list[str] | None, retry: bool, where: str,
            shard: Shard | None = None) -> Work | None:
    """Everything a driver does before its first claim, whatever computes the pairs (this process, Ray
    actors): register `worker` with the resolved settings, bring the ledger in line with the plan (or
    re-queue the failed pairs of a retry), clean up temporaries of killed writers, say what is to do.
    None when nothing is. `where` says what makes the pairs (the device, the Ray workers); `shard`,
    which shard's ledger this is (None: OUT's own)."""
    out = settings.out
    on = f"shard {shard}: " if shard is not None else ""
    # Before anything changes: a live worker with other pixel settings refuses us (ConfigError).
    ledger.register(worker, recipe_settings(resolved), settings.lease_s)
    ledger.store_hashes(*hashes.changes())
    # Sharded, OUT is shared with other hosts, whose PIDs mean nothing here: only this shard's
    # own outputs are judged by PID, the report's files by age alone.
    remove_stale_temporaries(out, [p.output for p in plan] + ledger.outputs(), shared=shard is not None)
    only = None
    if retry:
        # Only the failed pairs change: their recipe becomes this retry's, the rest of the
        # ledger (and the settings a plain `run` compares against) stay as they were.
        only = set(ledger.requeue_failed(only_failed_kinds, plan))
    else:
        ledger.sync(plan, out, settings.lease_s)
        ledger.store_settings(absolute_paths(settings).to_dict())
        ledger.set_meta("skipped", [k.to_dict() for k in plan.skipped])  # for the report
    if plan.skipped:
        display.note(f"{skipped_line(plan.skipped)}; report.html names them")
    counts = ledger.counts()
    already = counts["done"]
    todo = len(only) if only is not None else counts["pending"] + counts["running"]
    skipped_failed = 0 if retry else counts["failed"]
    if skipped_failed:
        again = f"nst-batch retry {out}" + (f" --shard {shard}" if shard is not None else "")
        display.note(f"{on}{skipped_failed} failed pair(s) from earlier runs are left alone; '{again}' re-runs them")
    if todo == 0:
        what = "no failed pairs to retry" if retry else f"all {already} pair(s) are done or failed"
        display.note(f"{on}nothing to do in {out}: {what}")
        return None
    display.note(f"{on}{todo} pair(s) to make on {where}, {already} already done")
    pairs = {(p.content, p.style): p for p in plan}
    return Work(pairs, {k: p.recipe for k, p in pairs.items()}, only, already, todo)


class Books:
    """A pair's end as every driver records it: the ledger's word (done only while this worker still
    holds the claim under its recipe), the heartbeat let go, the run's result and the display."""

    def __init__(self, ledger: Ledger, worker: str, display: Display, beat: Heartbeat, result: RunResult):
        self.ledger, self.worker, self.display, self.beat, self.result = ledger, worker, display, beat, result

    def failed(self, row: Row, e: BaseException) -> None:
        name = f"{row.style} × {row.content}"
        kind, msg = (e.kind, str(e)) if isinstance(e, PairError) else ("internal", f"{type(e).__name__}: {e}")
        self.ledger.fail(row.id, self.worker, kind, msg)
        self.beat.drop(row.id)
        self.result.failed += 1
        self.result.failures.append((name, kind, msg))
        self.display.pair_end(name, False, time.time() - (row.started_at or time.time()), f"{kind}: {msg}")

    def done(self, row: Row, steps: int, final: LogRow, note: str | None, finished_at: float,
             seconds: float | None = None, curve: str | None = None, method: str = "optimize") -> bool:
        """Record a pair whose image is on disk; False (and a note) when the claim had lapsed meanwhile.
        `seconds`: the compute time when it is not the time since the claim (a pair queued on a Ray actor);
        `curve`: losslog.curve_record of its loss rows, which the report draws."""
        recorded = self.ledger.done(Finished(row.id, self.worker, steps, final.content, final.style, final.tv,
                                             final.total, recipe=row.recipe, note=note, finished_at=finished_at,
                                             seconds=seconds, curve=curve, method=method))
        self.beat.drop(row.id)
        if not recorded:  # our lease ran out (process stopped?) and the pair was reset meanwhile
            self.display.note(f"{row.style} × {row.content}: not recorded: this worker's claim on it had lapsed "
                              "and the pair was reset; it is made again with its current recipe")
            return False
        self.result.made += 1
        took = seconds if seconds is not None else finished_at - (row.started_at or finished_at)
        self.display.pair_end(f"{row.style} × {row.content}", True, took, note or "")
        return True


def _one_host(ledger: Ledger, display: Display, shard: Shard) -> None:
    """A shard's ledger has one writer host (SQLite locking over a network filesystem is not to be
    trusted between hosts). A worker of another host still registered may be one that died (a node
    lost, its task requeued here): wait for its registration to lapse; one that keeps beating is
    alive, and this run stops (exit 2)."""
    me = socket.gethostname()
    deadline = None
    while others := [w for w in ledger.live_workers() if w[0].rpartition(":")[0] != me]:
        worker, age, lease_s = others[0]
        if deadline is None:
            deadline = time.monotonic() + max(lease - a for _, a, lease in others) + 1
            display.note(f"shard {shard}: {worker} was live {age:.0f}s ago; waiting up to "
                         f"{deadline - time.monotonic():.0f}s for its lease to lapse (one host per shard)")
        elif time.monotonic() > deadline:
            raise ConfigError(f"--shard {shard}: {worker} is still running this shard on {ledger.path.parent}; "
                              "one host per shard: run another shard, or stop that one first")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def absolute_paths(settings: Settings) -> Settings:
    """Folders as absolute paths, so `retry` works from any directory."""
    return settings.replace(content=settings.content.resolve(), styles=settings.styles.resolve(),
                            out=settings.out.resolve())


def _work(ledger: Ledger, engine: Engine, display: Display, work: Work, worker: str, folder: Path,
          networks: tuple[dict, dict] = ({}, {})) -> RunResult:
    """`folder`: where the ledger and the loss log are (OUT, or a shard's folder); images go to OUT."""
    s = engine.settings
    out = s.out
    pairs, recipes, only = work.pairs, work.recipes, work.only
    result = RunResult()
    loss_log = LossLog(folder)
    trainer = training.Trainer(folder, ledger, engine, *networks, loss_log, display.note)
    io = IOStage(s.size, s.max_megapixels)
    styles = engine.style_pixels  # a StyleImages (run): where each style key's file is
    beat = Heartbeat(folder, worker, every=max(1.0, s.lease_s / 4))
    books = Books(ledger, worker, display, beat, result)
    record_failure = books.failed
    writing: set[int] = set()  # computed, file being written: kept (not released) on Ctrl-C

    def settle(wait: bool = False) -> None:
        for (row, made), error, finished_at in io.finished(wait):
            writing.discard(row.id)
            if error is not None:
                record_failure(row, error)
            else:
                books.done(row, made.steps, made.final, made.note, finished_at, curve=curve_record(made.logs),
                           method=made.job.method)

    def claim(style: str | None = None) -> Row | None:
        row = ledger.claim(worker, s.lease_s, only, style=style, recipes=recipes)
        if row is not None:
            beat.hold(row.id)
        return row

    display.start(work.already + work.todo, work.already)
    with Signals() as signals:
        try:
            while (first := claim()) is not None:
                claimed = [first]
                while len(claimed) < s.batch and (r := claim(first.style)):
                    claimed.append(r)
                signals.check()
                rows, jobs, metas = [], [], []
                for r in claimed:  # photos decoded here (on the I/O thread when prefetched); a bad one fails now
                    try:
                        photo, meta = io.photo(r.content_path)
                        job = trainer.job(job_for(r, pairs.get((r.content, r.style)), photo, styles))
                        if job.method == "network":  # trained (with checkpoints) or loaded, once per style
                            signals.computing = True  # Ctrl-C stops training at once: the checkpoint stays
                            try:
                                trainer.ensure(job)
                            finally:
                                signals.computing = False
                        jobs.append(job)
                        rows.append(r)
                        metas.append(meta)
                    except Exception as e:
                        record_failure(r, e)
                nxt = ledger.peek(only, recipes)  # decoded on a thread while this batch computes
                if nxt is not None:
                    io.prefetch(nxt.content_path)
                if not jobs:
                    continue
                by_job = dict(zip(jobs, rows))

                def on_log(j: Job, lr) -> None:
                    loss_log.write(j, by_job[j].attempts, [lr])
                    if j is jobs[0]:
                        display.step(lr.step, lr.total)

                cfg = engine.optim_for(jobs[0])  # its style's steps, or a network's refine_steps
                steps_per_pair = cfg.steps * len(cfg.scales)
                display.pair_start(" + ".join(f"{r.style} × {r.content}" for r in rows), steps_per_pair)
                signals.computing = True
                try:
                    made = engine.make(jobs, on_log, display.note)
                finally:
                    signals.computing = False
                if any(not m.ok for m in made):
                    signals.check()  # an Interrupted that a library wrapped is still a Ctrl-C
                for r, m, meta in zip(rows, made, metas):
                    if m.error is not None:  # this pair failed; the others of its batch go on
                        record_failure(r, m.error)
                        continue
                    m.note = note_for(m, meta, styles)
                    io.write((r, m), m.image, meta, s, out / r.output, out / thumb_path("o", r.output))
                    writing.add(r.id)
                signals.check()
                settle()
                signals.check()
        except Interrupted:
            for pair_id in beat.holding() - writing:
                ledger.release(pair_id, worker)
                beat.drop(pair_id)
            raise
        finally:
            # Outputs already computed are worth keeping, even on Ctrl-C: wait for their files.
            settle(wait=True)
            beat.stop()
            io.close()
            display.close()
            loss_log.close()
    return result
