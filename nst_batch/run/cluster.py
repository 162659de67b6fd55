"""The Ray driver: the same run over every GPU of a Ray cluster (`nst-batch run --ray ...`).

Ray Core only. One actor (`EngineWorker`) per GPU holds one `engine.Engine` (VGG19 loaded once, its
own style-target cache) and turns jobs into encoded images and loss rows; it reads the photos by
path, so only the inputs must be visible to every node. This process alone touches OUT: it claims
pairs in the ledger (as one worker, host:pid), writes the images and the loss log, and records every
end through the same `runner` functions a local run uses. OUT stays on this machine's disk.

Scheduling: an actor keeps one style while that style has pairs (its style targets stay cached), a
new style goes to an actor where no other actor works on it, and each actor has at most `queue`
calls outstanding (one computing, the next waiting, so no round trip is lost between pairs).

Faults: an actor that dies mid-pair (or runs past `pair_timeout_s`, and is then killed) sends its
pair back to pending with the attempt counted while Ray restarts the actor; the third loss of one
pair fails it as `worker_lost`. A pair only queued behind the lost one goes back uncounted. A killed
driver leaves its claims to a dead local PID, which the next driver takes over at once; a second
driver on the same OUT is refused (a lock file, `DRIVER_LOCK`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import training
from ..core.engine import Engine
from ..errors import ConfigError, NstError, PairError, WeightsError
from ..files.layout import thumb_path
from ..batch.ledger import Ledger, Row, worker_id
from .lifecycle import Heartbeat, Interrupted, Signals
from ..files.losslog import LossLog, curve_record
from ..config.manifest import Settings
from ..core.optimize import LogRow
from ..batch.plan import Pair, recipe_settings
from ..files.encode import encode
from ..files.stage import StyleImages, load_photo, write_output
from .jobs import job_for, note_for
from .progress import Display
from ..batch.shards import check_layout
from .runner import Books, RunResult, Work, absolute_paths, plan_for, prepare

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'nst-batch[ray]'"
DRIVER_LOCK = ".nst-ray-driver.lock"  # in OUT: held (flock) by the one Ray driver working on it
LOST_LIMIT = 3  # a pair whose actor is lost this many times fails as worker_lost
_TICK_S = 0.5  # how often the driver looks at timeouts and restarting actors


@dataclass(frozen=True)
class RayOptions:
    """`run --ray` options, resolved once by the CLI."""

    address: str  # "local" (start a cluster here), "auto" (the one `ray start` made), or host:port / ray://...
    workers: int | None = None  # actors; None: as many as the cluster's GPUs (or CPUs) allow
    gpus_per_worker: float | None = None  # None: 1, or 0 when the manifest's device is cpu
    cpus_per_worker: float = 1.0  # also the actor's torch threads
    pair_timeout_s: float = 3600.0  # longer than any pair takes: a call still running then is killed
    queue: int = 2  # calls outstanding per actor
    start_timeout_s: float = 600.0  # for an actor to load its engine (a cold node, an autoscaler adding one)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


# -- the actor ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One job's result as it crosses from an actor to the driver: bytes, not tensors; the error as
    (kind, message), since PairError does not pickle."""

    data: bytes | None
    thumb: bytes | None  # the report's thumbnail (encode.thumbnail_jpeg), made where the image is
    logs: list[LogRow]
    final: LogRow | None
    steps: int
    note: str | None
    error: tuple[str, str] | None
    seconds: float


class EngineWorker:
    """A Ray actor: one Engine for its lifetime; Ray runs its calls one at a time, in order. A setup
    error (missing weights, no such device) is kept and reported by `ready`, not raised, so the
    driver can print it as one line and exit with its code."""

    def __init__(self, settings: Settings, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.error: tuple[int, str] | None = None
        self.engine: Engine | None = None
        try:
            self.engine = Engine(settings, style_pixels=StyleImages(settings.max_megapixels))
        except NstError as e:
            self.error = (e.exit_code, str(e))

    def ready(self) -> tuple[Any, ...]:
        """("ok", resolved settings, device, pid) or ("error", exit code, message)."""
        if self.error is not None:
            return ("error", *self.error)
        return ("ok", self.engine.settings, str(self.engine.device), os.getpid())

    def make(self, claimed: list[tuple[Row, Pair | None]]) -> list[Outcome]:
        """One Outcome per claimed (row, pair), in order: each photo decoded here (once for all its styles),
        the jobs made as the local driver makes them (jobs.job_for), the images encoded here."""
        s = self.engine.settings
        styles = self.engine.style_pixels
        photos: dict[str, Any] = {}  # path -> (tensor, PhotoMeta), or the PairError decoding it raised
        jobs, metas, failed = [], [], {}
        for i, (row, pair) in enumerate(claimed):
            try:
                if row.content_path not in photos:
                    try:
                        photos[row.content_path] = load_photo(Path(row.content_path), s.size, s.max_megapixels)
                    except PairError as e:
                        photos[row.content_path] = e
                if isinstance(photos[row.content_path], PairError):
                    raise photos[row.content_path]
                photo, meta = photos[row.content_path]
                jobs.append((i, job_for(row, pair, photo, styles)))
                metas.append(meta)
            except PairError as e:
                failed[i] = Outcome(None, None, [], None, 0, None, (e.kind, str(e)), 0.0)
        t0 = time.perf_counter()
        made = self.engine.make([j for _, j in jobs])
        took = time.perf_counter() - t0
        outcomes: dict[int, Outcome] = dict(failed)
        for (i, _), m, meta in zip(jobs, made, metas):
            # The file carries the photo's metadata, read where it was decoded.
            enc = encode(m.image, meta, s) if m.ok else None
            outcomes[i] = Outcome(enc.data if enc else None, enc.thumb if enc else None, m.logs, m.final, m.steps,
                                  note_for(m, meta, styles) if m.ok else None,
                                  None if m.ok else (m.error.kind, str(m.error)), took)
        return [outcomes[i] for i in range(len(claimed))]


# -- the driver --------------------------------------------------------------------------------------

@dataclass
class _Call:
    ref: Any
    rows: list[Row]


@dataclass
class _Slot:
    """One actor as the driver sees it: its calls in order (the first one is computing), the style it
    keeps, and, while Ray restarts it, the readiness call the driver waits for."""

    handle: Any
    calls: deque[_Call] = field(default_factory=deque)
    style: str | None = None
    head_since: float = 0.0  # when the first call started computing
    ping: Any = None  # a `ready` call in flight: not given pairs until it answers
    ping_at: float = 0.0  # when to send the next `ready` (the actor said it is still restarting)
    restarting: bool = False


def run_ray(settings: Settings, display: Display, options: RayOptions, only_failed_kinds: list[str] | None = None,
            retry: bool = False) -> RunResult:
    """`runner.run` with Ray actors computing the pairs. Raises ConfigError (exit 2) without Ray, when
    the cluster cannot be reached or has nothing to run on, or when another driver holds OUT."""
    if settings.method == "network":  # only the local driver trains networks (auto: optimize here)
        raise ConfigError("--ray does not train per-style networks yet: use method optimize or auto (key 'method')")
    ray = import_ray()
    check_layout(settings.out, None)  # a sharded OUT is not a Ray driver's: refused before anything starts
    settings = absolute_paths(settings)  # actors run elsewhere: the paths they are sent must not be relative
    lock = _lock(settings.out) if settings.out.is_dir() else None  # a second driver: refused before any start
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (0 if settings.device == "cpu" else 1)
    # A CPU actor computes on its CPU, whatever `device: auto` would find on its node.
    actor_settings = settings if gpus else settings.replace(device="cpu")
    try:
        _connect(ray, options.address)
        try:
            slots, resolved, device, new_actor = _start(ray, actor_settings, gpus, options)
            plan, hashes = plan_for(resolved)
            lock = lock if lock is not None else _lock(settings.out)
            worker = worker_id()
            with Ledger(settings.out) as ledger:
                try:
                    # `auto` optimises here, but a pair a network made in a local run stays done: its recipe
                    # is the network's, and the plain plan would send it back to be made again.
                    plan = training.assign(plan, resolved, ledger.done_recipes(), device.partition(":")[0],
                                           networks=False)[0]
                    work = prepare(ledger, settings, resolved, plan, hashes, worker, display, only_failed_kinds,
                                   retry, f"{len(slots)} Ray worker(s) ({device})")
                    if work is None:
                        return RunResult()
                    return _drive(ray, ledger, resolved, display, work, worker, slots, new_actor, options,
                                  styles=list(dict.fromkeys(p.style for p in plan)))
                finally:
                    ledger.unregister(worker)
        finally:
            ray.shutdown()  # a cluster started here stops; on a shared one, this job's actors end
    finally:
        if lock is not None:
            os.close(lock)


def _lock(out: Path) -> int:
    """Hold OUT for this driver (flock: let go by the kernel however the process ends)."""
    fd = os.open(out / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"another Ray driver ({holder}) is running on {out}; one driver per output folder: "
                          "wait for it to finish or use another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, worker_id().encode(), 0)
    return fd


def _connect(ray, address: str) -> None:
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at '{address}' (--ray): {_first_line(e)}") from None


def _start(ray, settings: Settings, gpus: float, options: RayOptions):
    """Create the actors and wait for each to load its engine. Returns them, the settings they resolved
    (all alike, or ConfigError: the recipe must be one), their device, and how to make another."""
    total = ray.cluster_resources()
    n = options.workers
    if n is None:
        have = total.get("GPU", 0) if gpus else total.get("CPU", 0)
        n = int(have // (gpus or options.cpus_per_worker or 1))
        if n < 1:
            what = (f"no GPU ({gpus:g} per worker asked); use --device cpu or --ray-gpus-per-worker 0"
                    if gpus else f"under {options.cpus_per_worker:g} CPU")
            raise ConfigError(f"the Ray cluster has {what} (--ray)")
    actor = ray.remote(EngineWorker).options(
        num_gpus=gpus, num_cpus=options.cpus_per_worker, max_restarts=-1, max_task_retries=0)
    threads = max(1, int(options.cpus_per_worker))
    def new_actor():
        return actor.remote(settings, threads)

    slots = [_Slot(new_actor()) for _ in range(n)]
    refs = [s.handle.ready.remote() for s in slots]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=options.start_timeout_s)
    if waiting:
        raise ConfigError(f"{len(waiting)} of {n} Ray worker(s) did not start in {options.start_timeout_s:g} s; "
                          f"the cluster has {dict(total)} (--ray-workers, --ray-gpus-per-worker)")
    try:
        answers = ray.get(refs)
    except ray.exceptions.RayError as e:
        raise ConfigError(f"a Ray worker could not start: {_first_line(e)}") from None
    for a in answers:
        _check(a)
    resolved = answers[0][1]
    for a in answers[1:]:
        if recipe_settings(a[1]) != recipe_settings(resolved):
            raise ConfigError("the Ray workers resolve different settings (precision: one GPU has bf16, another "
                              "not?); set 'precision' in the manifest")
    return slots, resolved, answers[0][2], new_actor


def _check(answer: tuple) -> None:
    """An actor's `ready` answer: a setup error is this run's error (weights: exit 3, else 2)."""
    if answer[0] == "error":
        raise (WeightsError if answer[1] == WeightsError.exit_code else ConfigError)(answer[2])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _drive(ray, ledger: Ledger, s: Settings, display: Display, work: Work, worker: str, slots: list[_Slot],
           new_actor, options: RayOptions, styles: list[str]) -> RunResult:
    from ray.exceptions import ActorDiedError, RayError, RayTaskError

    out = s.out
    result = RunResult()
    loss_log = LossLog(out)
    beat = Heartbeat(out, worker, every=max(1.0, s.lease_s / 4))
    books = Books(ledger, worker, display, beat, result)
    lost: dict[int, int] = {}  # pair id -> times its actor was lost under it, in this run
    by_ref: dict[Any, _Slot] = {}  # every call and `ready` in flight -> its actor
    exhausted: set[str] = set()  # styles a claim found nothing of

    def claim(style: str | None = None) -> Row | None:
        row = ledger.claim(worker, s.lease_s, work.only, style=style, recipes=work.recipes)
        if row is not None:
            beat.hold(row.id)
        return row

    def claim_for(slot: _Slot) -> list[Row]:
        """Up to `batch` pairs of one style: the actor's own style first (its targets are cached), then
        one no other actor works on, then any."""
        first = claim(slot.style) if slot.style is not None else None
        if first is None:
            taken = {o.style for o in slots if o is not slot}
            for st in styles:
                if st not in taken and st not in exhausted:
                    first = claim(st)
                    if first is not None:
                        break
                    exhausted.add(st)  # only a lapsed claim can bring it back, and claim() below finds that
        if first is None:
            first = claim()
        if first is None:
            return []
        rows = [first]
        while len(rows) < s.batch and (r := claim(first.style)):
            rows.append(r)
        slot.style = first.style
        return rows

    def submit(slot: _Slot) -> bool:
        rows = claim_for(slot)
        if not rows:
            return False
        call = _Call(slot.handle.make.remote([(r, work.pairs.get((r.content, r.style))) for r in rows]), rows)
        if not slot.calls:
            slot.head_since = time.time()
        slot.calls.append(call)
        by_ref[call.ref] = slot
        return True

    def finish(call: _Call, outcomes: list[Outcome]) -> None:
        for row, o in zip(call.rows, outcomes):
            loss_log.write(row, row.attempts, o.logs)
            if o.error is not None:
                books.failed(row, PairError(*o.error))
                continue
            try:
                finished_at = write_output(out / row.output, o.data, (out / thumb_path("o", row.output), o.thumb))
            except PairError as e:
                books.failed(row, e)
                continue
            books.done(row, o.steps, o.final, o.note, finished_at, seconds=o.seconds, curve=curve_record(o.logs))

    def lose(slot: _Slot, why: str) -> None:
        """The actor died or was killed: its calls in order; the first that failed was computing."""
        computing = True
        while slot.calls:
            call = slot.calls.popleft()
            by_ref.pop(call.ref, None)
            try:
                outcomes = ray.get(call.ref, timeout=60)
            except RayTaskError as e:
                for row in call.rows:
                    books.failed(row, PairError("internal", f"Ray worker: {e.cause!r}"))
                continue
            except RayError:
                for row in call.rows:
                    if not computing:  # queued behind the lost one: it never began
                        ledger.release(row.id, worker, started=False)
                        beat.drop(row.id)
                        continue
                    lost[row.id] = lost.get(row.id, 0) + 1
                    if lost[row.id] >= LOST_LIMIT:
                        books.failed(row, PairError("worker_lost", f"its Ray worker was lost {lost[row.id]} times "
                                                    f"(last: {why}); see the Ray logs"))
                    else:
                        ledger.release(row.id, worker)
                        beat.drop(row.id)
                computing = False
                continue
            finish(call, outcomes)
            computing = True  # that one had finished: the next one was the one computing
        slot.style, slot.restarting, slot.ping, slot.ping_at = None, True, None, time.time()

    def answered(slot: _Slot) -> None:
        """A restarting actor's `ready` came back."""
        ref, slot.ping = slot.ping, None
        try:
            a = ray.get(ref)
        except ActorDiedError:  # for good (Ray will not restart it): a new actor takes its place
            slot.handle = new_actor()
            slot.ping_at = time.time()
            return
        except RayError:  # still restarting: ask again shortly
            slot.ping_at = time.time() + _TICK_S
            return
        _check(a)  # a node without the weights, say
        if recipe_settings(a[1]) != recipe_settings(s):
            # Restarted on another node that resolves other settings (auto precision on another GPU):
            # its pixels would not be what the recipes say, so it gets no pair.
            raise ConfigError("a restarted Ray worker resolves other settings than this run's (precision: "
                              "another kind of GPU?); set 'precision' in the manifest")
        slot.restarting = False

    display.start(work.already + work.todo, work.already)
    idle_since: float | None = None
    with Signals() as signals:
        try:
            while True:
                signals.check()
                now = time.time()
                for slot in slots:
                    if slot.restarting and slot.ping is None and now >= slot.ping_at:
                        slot.ping = slot.handle.ready.remote()
                        by_ref[slot.ping] = slot
                    while not slot.restarting and len(slot.calls) < options.queue and submit(slot):
                        pass
                if not any(slot.calls for slot in slots):
                    # An actor that could take a pair found none, or none is pending: the run is over.
                    if any(not slot.restarting for slot in slots) or ledger.peek(work.only, work.recipes) is None:
                        break
                    # Pairs are left but every actor is restarting (a node went away?): wait, not forever.
                    idle_since = idle_since or now
                    if now - idle_since > options.start_timeout_s:
                        raise ConfigError(f"no Ray worker has been available for {options.start_timeout_s:g} s; "
                                          "the pairs left stay pending: run again when the cluster is back")
                else:
                    idle_since = None
                # Only the first call of each actor can finish first (Ray runs them in order), and `ready`s.
                heads = [slot.calls[0].ref for slot in slots if slot.calls] + [sl.ping for sl in slots if sl.ping is not None]
                ready, _ = ray.wait(heads, num_returns=1, timeout=_TICK_S) if heads else ([], time.sleep(_TICK_S))
                for ref in ready:
                    slot = by_ref.get(ref)
                    if slot is None:  # settled by a lose() of the same tick
                        continue
                    if ref == slot.ping:
                        by_ref.pop(ref)
                        answered(slot)
                        continue
                    if not slot.calls or slot.calls[0].ref != ref:
                        continue  # settled by a lose() of this tick
                    try:
                        outcomes = ray.get(ref)
                    except RayTaskError as e:  # not a PairError (the engine catches those): a bug
                        call = slot.calls.popleft()
                        by_ref.pop(ref)
                        for row in call.rows:
                            books.failed(row, PairError("internal", f"Ray worker: {e.cause!r}"))
                        slot.head_since = time.time()
                        continue
                    except RayError as e:
                        lose(slot, f"{type(e).__name__}")
                        continue
                    call = slot.calls.popleft()
                    by_ref.pop(ref)
                    slot.head_since = time.time()
                    finish(call, outcomes)
                now = time.time()
                for slot in slots:  # hung: kill it; Ray restarts it, and its calls fail into lose()
                    if slot.calls and now - slot.head_since > options.pair_timeout_s:
                        ray.kill(slot.handle, no_restart=False)
                        lose(slot, f"no answer in pair_timeout_s={options.pair_timeout_s:g} s, killed")
        except Interrupted:
            for slot in slots:
                for call in slot.calls:
                    for row in call.rows:
                        ledger.release(row.id, worker)
                        beat.drop(row.id)
            raise
        finally:
            beat.stop()
            display.close()
            loss_log.close()
    return result
