"""The local driver of a run: plan -> ledger -> engine -> outputs and loss log.

`run` claims pairs from the ledger (one at a time, or `batch` of one style) until none is left, so
any number of processes can share an output folder; it decodes the next photo on a thread while the
engine computes, hands the claimed pairs to `engine.Engine.make`, writes each image and its loss
rows, and records every outcome; one bad pair never stops the others. Signals, heartbeats and
temporary-file cleanup are `lifecycle`'s. What any driver does around the engine (plan and ledger
set-up: `plan_for`, `prepare`; writing an image: `write_output`; recording an end: `Books`) is here
too, and `cluster`'s Ray driver calls the same functions.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import images
from .engine import Engine, Job, Made, encode
from .errors import PairError
from .files import write_atomic
from .ledger import Ledger, Row, worker_id
from .lifecycle import Heartbeat, Interrupted, Signals, remove_stale_temporaries
from .losslog import LossLog
from .manifest import Settings
from .names import skipped_line
from .optimize import LogRow
from .plan import HashCache, Pair, Plan, make_plan, recipe_settings
from .progress import Display


@dataclass
class RunResult:
    made: int = 0
    failed: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (pair name, kind, message)


def run(settings: Settings, display: Display, only_failed_kinds: list[str] | None = None,
        retry: bool = False) -> RunResult:
    """Make every pair of the plan that is not done yet. With retry=True, only the failed ones."""
    # The model and device first: a weights typo must fail before the ledger is touched, or the
    # recipe change it implies would send every finished pair back to pending.
    engine = Engine(settings)
    # The engine resolved precision for its device (auto: bf16 on CUDA, fp32 elsewhere): the recipe records that.
    plan, hashes = plan_for(engine.settings)
    worker = worker_id()
    with Ledger(settings.out) as ledger:
        try:
            work = prepare(ledger, settings, engine.settings, plan, hashes, worker, display, only_failed_kinds,
                           retry, str(engine.device))
            if work is None:
                return RunResult()
            return _work(ledger, engine, display, work, worker)
        finally:
            ledger.unregister(worker)


def plan_for(resolved: Settings) -> tuple[Plan, HashCache]:
    """The plan of a run with these resolved settings, reading only the inputs changed since the last
    plan on OUT; OUT is created once the plan stands (a bad folder never creates it)."""
    hashes = HashCache(Ledger.stored_hashes(resolved.out))  # inputs unchanged since the last plan are not read
    plan = make_plan(resolved, hashes)
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
            display: Display, only_failed_kinds: list[str] | None, retry: bool, where: str) -> Work | None:
    """Everything a driver does before its first claim, whatever computes the pairs (this process, Ray
    actors): register `worker` with the resolved settings, bring the ledger in line with the plan (or
    re-queue the failed pairs of a retry), clean up temporaries of killed writers, say what is to do.
    None when nothing is. `where` says what makes the pairs (the device, the Ray workers)."""
    out = settings.out
    # Before anything changes: a live worker with other pixel settings refuses us (ConfigError).
    ledger.register(worker, recipe_settings(resolved), settings.lease_s)
    ledger.store_hashes(*hashes.changes())
    remove_stale_temporaries(out, [p.output for p in plan] + ledger.outputs())
    only = None
    if retry:
        # Only the failed pairs change: their recipe becomes this retry's, the rest of the
        # ledger (and the settings a plain `run` compares against) stay as they were.
        only = set(ledger.requeue_failed(only_failed_kinds, plan))
    else:
        ledger.sync(plan, out, settings.lease_s)
        ledger.set_meta("settings", absolute_paths(settings).to_dict())
        ledger.set_meta("skipped", [k.to_dict() for k in plan.skipped])  # for the report
    if plan.skipped:
        display.note(f"{skipped_line(plan.skipped)}; report.html names them")
    counts = ledger.counts()
    already = counts["done"]
    todo = len(only) if only is not None else counts["pending"] + counts["running"]
    skipped_failed = 0 if retry else counts["failed"]
    if skipped_failed:
        display.note(f"{skipped_failed} failed pair(s) from earlier runs are left alone; "
                     f"'nst-batch retry {out}' re-runs them")
    if todo == 0:
        what = "no failed pairs to retry" if retry else f"all {already} pair(s) are done or failed"
        display.note(f"nothing to do in {out}: {what}")
        return None
    display.note(f"{todo} pair(s) to make on {where}, {already} already done")
    pairs = {(p.content, p.style): p for p in plan}
    return Work(pairs, {k: p.recipe for k, p in pairs.items()}, only, already, todo)


def write_output(path: Path, data: bytes) -> float:
    """An encoded image into place atomically; the time it got there. A refusal fails the pair as `write`."""
    try:
        write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise PairError("write", f"cannot write {path}: {e.strerror or e}") from None
    return time.time()  # the pair's end: the ledger may hear of it a little later


def job_for(row: Row, pairs: dict[tuple[str, str], Pair], image=None) -> Job:
    """The engine's job for a claimed row; the plan's style hash keys the engine's style cache."""
    pair = pairs.get((row.content, row.style))
    return Job(row.content, row.style, Path(row.content_path), Path(row.style_path),
               style_hash=pair.style_hash if pair is not None else None, image=image)


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
             seconds: float | None = None) -> bool:
        """Record a pair whose image is on disk; False (and a note) when the claim had lapsed meanwhile.
        `seconds`: the compute time when it is not the time since the claim (a pair queued on a Ray actor)."""
        recorded = self.ledger.done(row.id, self.worker, steps, final.content, final.style, final.tv, final.total,
                                    note, finished_at, recipe=row.recipe, seconds=seconds)
        self.beat.drop(row.id)
        if not recorded:  # our lease ran out (process stopped?) and the pair was reset meanwhile
            self.display.note(f"{row.style} × {row.content}: not recorded: this worker's claim on it had lapsed "
                              "and the pair was reset; it is made again with its current recipe")
            return False
        self.result.made += 1
        took = seconds if seconds is not None else finished_at - (row.started_at or finished_at)
        self.display.pair_end(f"{row.style} × {row.content}", True, took, note or "")
        return True


def absolute_paths(settings: Settings) -> Settings:
    """Folders as absolute paths, so `retry` works from any directory."""
    return settings.replace(content=settings.content.resolve(), styles=settings.styles.resolve(),
                            out=settings.out.resolve())


class _BackgroundIO:
    """Decodes the next content image and encodes finished outputs on threads, overlapped with compute.

    Pillow releases the GIL while it decodes, resizes and encodes, so on a GPU the next pair's
    photo is ready and the last pair's PNG is written while VGG runs. A pair is marked done only
    after its file is on disk: a crash before that leaves it `running`, and it is redone.
    """

    def __init__(self, max_megapixels: float):
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nst-io")
        self.max_mp = max_megapixels
        self.loads: dict[str, Future] = {}
        self.writes: list[tuple[Row, Future, Made]] = []

    def prefetch(self, path: str) -> None:
        # One look-ahead only: a photo another worker took instead must not pile up in memory.
        for other in [p for p in self.loads if p != path]:
            self.loads.pop(other).cancel()
        if path not in self.loads:
            self.loads[path] = self.pool.submit(images.load_rgb, Path(path), self.max_mp)

    def content(self, path: str):
        fut = self.loads.pop(path, None)
        return fut.result() if fut is not None else images.load_rgb(Path(path), self.max_mp)

    def write(self, row: Row, made: Made, path: Path, fmt: str, quality: int) -> None:
        self.writes.append((row, self.pool.submit(lambda: write_output(path, encode(made.image, fmt, quality))),
                            made))

    def finished(self, wait: bool = False):
        """Yield (row, made, error, finished_at) for writes that are over (all of them if wait)."""
        still = []
        for row, fut, made in self.writes:
            if wait or fut.done():
                error = fut.exception()
                yield row, made, error, (time.time() if error else fut.result())
            else:
                still.append((row, fut, made))
        self.writes = still

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _work(ledger: Ledger, engine: Engine, display: Display, work: Work, worker: str) -> RunResult:
    s = engine.settings
    out = s.out
    pairs, recipes, only = work.pairs, work.recipes, work.only
    result = RunResult()
    loss_log = LossLog(out)
    io = _BackgroundIO(s.max_megapixels)
    beat = Heartbeat(out, worker, every=max(1.0, s.lease_s / 4))
    books = Books(ledger, worker, display, beat, result)
    record_failure = books.failed
    steps_per_pair = s.steps * len(s.scales)
    writing: set[int] = set()  # computed, file being written: kept (not released) on Ctrl-C

    def settle(wait: bool = False) -> None:
        for row, made, error, finished_at in io.finished(wait):
            writing.discard(row.id)
            if error is not None:
                record_failure(row, error)
            else:
                books.done(row, made.steps, made.final, made.note, finished_at)

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
                rows, jobs = [], []
                for r in claimed:  # photos decoded here (on the I/O thread when prefetched); a bad one fails now
                    try:
                        jobs.append(job_for(r, pairs, io.content(r.content_path)))
                        rows.append(r)
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

                display.pair_start(" + ".join(f"{r.style} × {r.content}" for r in rows), steps_per_pair)
                signals.computing = True
                try:
                    made = engine.make(jobs, on_log, display.note)
                finally:
                    signals.computing = False
                if any(not m.ok for m in made):
                    signals.check()  # an Interrupted that a library wrapped is still a Ctrl-C
                for r, m in zip(rows, made):
                    if m.error is not None:  # this pair failed; the others of its batch go on
                        record_failure(r, m.error)
                        continue
                    io.write(r, m, out / r.output, s.format, s.quality)
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
