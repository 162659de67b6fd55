"""The Ray backend: the same run over every GPU of a Ray cluster (`nst-batch run --ray ...`).

Ray Core only. One actor (`EngineWorker`) per GPU holds one `engine.Engine` (VGG19 loaded once, its
own style-target cache) and turns jobs into records: encoded images and loss rows. It reads the photos
by path, so only the inputs must be visible to every node. This process alone touches OUT: the drive
(run/drive.py) claims, writes the images and the loss log and records every end, as in a local run.
Each actor is a slot that keeps one style while that style has pairs, with at most `queue` calls
outstanding (one computing, the next waiting, so no round trip is lost between pairs).

An actor that dies (or is killed by the drive for running past pair_timeout_s) fails its calls in order:
the first was computing, those behind it only queued (`_lose`); Ray restarts it, and it gets pairs again
once it answers `ready` with this run's settings. A killed driver leaves its claims to a dead local PID,
which the next driver takes over at once; a second driver on the same OUT is refused (`DRIVER_LOCK`).
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

from ..batch.ledger import Row, worker_id
from ..batch.plan import Pair, recipe_settings
from ..batch.shards import check_layout
from ..config.manifest import Settings
from ..core.engine import Engine
from ..errors import ConfigError, NstError, PairError, WeightsError
from ..files.encode import encode
from ..files.stage import StyleImages, load_photo
from .backend import Backend, Event, Returned, Lost, Slot, failed
from .drive import RunResult
from .jobs import job_for, note_for
from .local import record_of
from .options import RayOptions
from .progress import Display
from .record import Record, failure
from .session import absolute_paths, plan_for, work_through

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'nst-batch[ray]'"
DRIVER_LOCK = ".nst-ray-driver.lock"  # in OUT: held (flock) by the one Ray driver working on it


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def run_ray(settings: Settings, display: Display, options: RayOptions, only_failed_kinds: list[str] | None = None,
            retry: bool = False) -> RunResult:
    """`local.run` with Ray actors computing the pairs. Raises ConfigError (exit 2) without Ray, when
    the cluster cannot be reached or has nothing to run on, or when another driver holds OUT."""
    if settings.method == "network":  # only the local backend trains networks (auto: optimize here)
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

            def backend(ledger, folder, work, styles, methods) -> Backend:
                return RayBackend(ray, slots, new_actor, resolved, work.pairs, options, device.partition(":")[0])

            # `auto` optimises here (networks=False), but a pair a network made in a local run stays done:
            # its recipe is the network's, and the plain plan would send it back to be made again.
            return work_through(settings, resolved, plan, hashes, display, backend,
                                where=f"{len(slots)} Ray worker(s) ({device})", device_type=device.partition(":")[0],
                                networks=False, only_failed_kinds=only_failed_kinds, retry=retry,
                                pair_timeout_s=options.pair_timeout_s)
        finally:
            ray.shutdown()  # a cluster started here stops; on a shared one, this job's actors end
    finally:
        if lock is not None:
            os.close(lock)


# -- the actor ---------------------------------------------------------------------------------------

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

    def make(self, claimed: list[tuple[Row, Pair | None]]) -> list[Record]:
        """The actor's one call into the engine: each photo decoded here (once for all its styles; only the
        inputs need be visible to every node), the jobs made as a local run makes them (jobs.job_for), each
        image encoded where it was made (the file carries the photo's metadata, read where it was decoded)."""
        s, styles = self.engine.settings, self.engine.style_pixels
        photos: dict[str, Any] = {}  # path -> (tensor, PhotoMeta), or the PairError decoding it raised
        ends: dict[int, Record] = {}
        jobs, metas = [], []
        for i, (row, pair) in enumerate(claimed):
            if row.content_path not in photos:
                try:
                    photos[row.content_path] = load_photo(Path(row.content_path), s.size, s.max_megapixels)
                except PairError as e:
                    photos[row.content_path] = e
            got = photos[row.content_path]
            if isinstance(got, PairError):
                ends[i] = failure(got.kind, str(got))
                continue
            jobs.append((i, job_for(row, pair, got[0], styles)))
            metas.append(got[1])
        t0 = time.perf_counter()
        made = self.engine.make([j for _, j in jobs])
        took = time.perf_counter() - t0
        for (i, _), m, meta in zip(jobs, made, metas):
            if m.ok:
                m.note = note_for(m, meta, styles)
                enc = encode(m.image, meta, s)
                ends[i] = record_of(m, enc.data, enc.thumb, took)
            else:
                ends[i] = record_of(m, seconds=took)
        return [ends[i] for i in range(len(claimed))]


# -- the backend -------------------------------------------------------------------------------------

@dataclass
class _Call:
    ref: Any
    rows: list[Row]


@dataclass(eq=False)
class _Actor(Slot):
    """One actor as a slot: its calls in order (the first one is computing) and, while Ray restarts
    it (ready False), the readiness call it is waited on with."""

    handle: Any = None
    pending: deque[_Call] = field(default_factory=deque)
    ping: Any = None  # a `ready` call in flight: not given pairs until it answers
    ping_at: float = 0.0  # when to send the next `ready` (the actor said it is still restarting)


class RayBackend(Backend):
    looks_ahead = False

    def __init__(self, ray, slots: list[_Actor], new_actor, resolved: Settings, pairs: dict[tuple[str, str], Pair],
                 options: RayOptions, device_type: str = "cuda"):
        self.ray, self.slots, self.new_actor, self.resolved, self.pairs = ray, slots, new_actor, resolved, pairs
        self.device_type = device_type  # the actors' (all alike): what `batch: auto` may claim for one call
        self.options, self.queue = options, options.queue
        self.by_ref: dict[Any, _Actor] = {}  # every call and `ready` in flight -> its actor
        self.backlog: list[Event] = []  # what a cancel settled, for the next poll
        self.idle_since: float | None = None

    def most_per_call(self, settings: Settings) -> int:
        """`batch: auto` on the actors' device type: 1 on CPU actors (a call of 64 pairs made one by one could
        outlast pair_timeout_s), settings.AUTO_BATCH_MAX on GPUs (each actor batches what fits)."""
        if settings.batch == "auto" and self.device_type != "cuda":
            return 1
        return super().most_per_call(settings)

    def submit(self, slot: _Actor, rows: list[Row]) -> None:
        call = _Call(slot.handle.make.remote([(r, self.pairs.get((r.content, r.style))) for r in rows]), rows)
        if not slot.pending:
            slot.busy_since = time.time()
        slot.pending.append(call)
        slot.calls = len(slot.pending)
        self.by_ref[call.ref] = slot

    def poll(self, timeout: float) -> list[Event]:
        events, self.backlog = self.backlog, []
        now = time.time()
        for slot in self.slots:
            if not slot.ready and slot.ping is None and now >= slot.ping_at:
                slot.ping = slot.handle.ready.remote()
                self.by_ref[slot.ping] = slot
        self._waiting(now)
        # Only the first call of each actor can finish first (Ray runs them in order), and `ready`s.
        heads = [s.pending[0].ref for s in self.slots if s.pending] + [s.ping for s in self.slots if s.ping is not None]
        if not heads:
            if not events:
                time.sleep(timeout)
            return events
        ready, _ = self.ray.wait(heads, num_returns=1, timeout=timeout)
        for ref in ready:
            slot = self.by_ref.pop(ref, None)
            if slot is None:  # settled by a _lose() of this poll
                continue
            if ref == slot.ping:
                self._answered(slot)
                continue
            if not slot.pending or slot.pending[0].ref != ref:
                continue  # settled already
            end, why = self._outcome(slot, slot.pending[0])
            if end is None:
                events += self._lose(slot, why)
                continue
            slot.pending.popleft()
            slot.calls = len(slot.pending)
            slot.busy_since = time.time() if slot.pending else None  # the next call begins now
            events.append(end)
        return events

    def _waiting(self, now: float) -> None:
        """Pairs are left (the drive would have ended otherwise) but every actor is restarting (a node
        went away?): wait for one, not forever."""
        if any(s.pending or s.ready for s in self.slots):
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        if now - self.idle_since > self.options.start_timeout_s:
            raise ConfigError(f"no Ray worker has been available for {self.options.start_timeout_s:g} s; "
                              "the pairs left stay pending: run again when the cluster is back")

    def _outcome(self, slot: _Actor, call: _Call, timeout: float | None = None) -> tuple[Returned | None, str]:
        """A call's end: its records; a failed call (not a PairError, which the engine catches: a bug)
        fails its pairs; (None, why) when the actor was lost under it."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return Returned(slot, call.rows, self.ray.get(call.ref, timeout=timeout)), ""
        except RayTaskError as e:
            return failed(slot, call.rows, "internal", f"Ray worker: {e.cause!r}"), ""
        except RayError as e:
            return None, type(e).__name__

    def _lose(self, slot: _Actor, why: str) -> list[Event]:
        """The actor died or was killed: its calls in order; the first that did not finish was computing."""
        events: list[Event] = []
        computing = True
        while slot.pending:
            call = slot.pending.popleft()
            self.by_ref.pop(call.ref, None)
            end, _ = self._outcome(slot, call, timeout=60)
            events.append(end if end is not None else Lost(slot, call.rows, computing, why))
            computing = end is not None  # after a finished call, the next one was the one computing
        slot.style, slot.ready, slot.ping, slot.ping_at = None, False, None, time.time()
        slot.calls, slot.busy_since = 0, None
        return events

    def _answered(self, slot: _Actor) -> None:
        """A restarting actor's `ready` came back."""
        from ray.exceptions import ActorDiedError, RayError

        ref, slot.ping = slot.ping, None
        try:
            answer = self.ray.get(ref)
        except ActorDiedError:  # for good (Ray will not restart it): a new actor takes its place
            slot.handle = self.new_actor()
            slot.ping_at = time.time()
            return
        except RayError:  # still restarting: ask again shortly
            slot.ping_at = time.time() + 0.5
            return
        # Restarted on another node that resolves other settings (auto precision on another GPU): its
        # pixels would not be what the recipes say, so it gets no pair.
        _check(answer, self.resolved)
        slot.ready = True

    def cancel(self, slot: _Actor, why: str) -> None:
        """Hung: kill it; Ray restarts it, and its calls fail into _lose."""
        self.ray.kill(slot.handle, no_restart=False)
        self.backlog += self._lose(slot, why)

    def lost_text(self, times: int, why: str) -> str:
        return f"its Ray worker was lost {times} times (last: {why}); see the Ray logs"


# -- set-up ------------------------------------------------------------------------------------------

def _lock(out) -> int:
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

    slots = [_Actor(f"Ray worker {i}", handle=new_actor()) for i in range(n)]
    refs = [s.handle.ready.remote() for s in slots]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=options.start_timeout_s)
    if waiting:
        raise ConfigError(f"{len(waiting)} of {n} Ray worker(s) did not start in {options.start_timeout_s:g} s; "
                          f"the cluster has {dict(total)} (--ray-workers, --ray-gpus-per-worker)")
    try:
        answers = ray.get(refs)
    except ray.exceptions.RayError as e:
        raise ConfigError(f"a Ray worker could not start: {_first_line(e)}") from None
    _check(answers[0])
    resolved = answers[0][1]
    for a in answers[1:]:
        _check(a, resolved, restarted=False)
    return slots, resolved, answers[0][2], new_actor


def _check(answer: tuple, resolved: Settings | None = None, restarted: bool = True) -> None:
    """An actor's `ready` answer: a setup error is this run's error (weights: exit 3, else 2), and so are
    settings that resolve other pixels than `resolved` (the recipe of every pair must be one)."""
    if answer[0] == "error":
        raise (WeightsError if answer[1] == WeightsError.exit_code else ConfigError)(answer[2])
    if resolved is not None and recipe_settings(answer[1]) != recipe_settings(resolved):
        raise ConfigError("a restarted Ray worker resolves other settings than this run's (precision: another kind "
                          "of GPU?); set 'precision' in the manifest" if restarted else
                          "the Ray workers resolve different settings (precision: one GPU has bf16, another not?); "
                          "set 'precision' in the manifest")
