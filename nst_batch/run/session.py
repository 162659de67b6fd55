"""What a run does around its loop, whatever computes the pairs: the plan, the ledger made ready,
the backend built, the drive run, the worker unregistered.

`run/local.py` (`run`) and `run/ray.py` (`run_ray`) make their engine or actors, plan with the
settings those resolved (`plan_for`), and hand each ledger to `work_through` with a function that
builds their backend.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable, Sequence

from ..batch.ledger import Ledger, worker_id
from ..batch.plan import Plan, make_plan, recipe_settings
from ..batch.shards import Shard, claim_layout
from ..config.manifest import Settings
from ..errors import ConfigError
from ..files.hashing import HashCache
from ..files.names import skipped_line
from ..batch.methods import assign, choice_line
from .backend import Backend
from .drive import Drive, RunResult, Work
from .lifecycle import remove_stale_temporaries
from .progress import Display

# (ledger, its folder, the work, each style's method, each pair's method) -> the backend to compute with
BackendFor = Callable[[Ledger, Path, Work, dict, dict], Backend]


def work_through(settings: Settings, resolved: Settings, plan: Plan, hashes: HashCache, display: Display,
                 backend_for: BackendFor, *, where: str, device_type: str,
                 only_failed_kinds: list[str] | None = None, retry: bool = False, shard: Shard | None = None,
                 pair_timeout_s: float | None = None) -> RunResult:
    """One ledger (OUT's own, or `shard`'s) made ready and worked through by the drive. `where` says what
    makes the pairs (the device, the Ray workers); `device_type`, what `auto` decides for (the engine's
    device type, or the Ray actors')."""
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
            # Which pairs a style's network makes (their recipes include its model's).
            plan, styles, methods = assign(plan, resolved, ledger.done_recipes(), device_type)
            work = prepare(ledger, settings, resolved, plan, hashes, worker, display, only_failed_kinds, retry,
                           where, shard)
            if work is None:
                return RunResult()
            for sm in styles.values():
                if sm.pending or sm.method == "network" and settings.method != "auto":
                    display.note(choice_line(sm, resolved, device_type))
            backend = backend_for(ledger, folder, work, styles, methods)
            order = list(dict.fromkeys(p.style for p in plan))
            return Drive(ledger, backend, display, work, worker, folder, resolved, order, pair_timeout_s).run()
        finally:
            ledger.unregister(worker)


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


def plan_for(resolved: Settings, shards: Sequence[Shard | None] = (None,)) -> tuple[Plan, HashCache]:
    """The plan of a run with these resolved settings, reading only the inputs changed since the last
    plan on OUT (sharded: only those of the shards' own pairs); OUT is created once the plan stands
    (a bad folder never creates it)."""
    first = shards[0].folder(resolved.out) if shards[0] is not None else resolved.out
    hashes = HashCache(Ledger.stored_hashes(first))  # inputs unchanged since the last plan are not read
    plan = make_plan(resolved, _only_for(resolved, shards, hashes))
    resolved.out.mkdir(parents=True, exist_ok=True)
    return plan, hashes


def prepare(ledger: Ledger, settings: Settings, resolved: Settings, plan: Plan, hashes: HashCache, worker: str,
            display: Display, only_failed_kinds: list[str] | None, retry: bool, where: str,
            shard: Shard | None = None) -> Work | None:
    """Everything before the first claim, whatever computes the pairs: register `worker` with the resolved
    settings, bring the ledger in line with the plan (or re-queue the failed pairs of a retry), clean up
    temporaries of killed writers, say what is to do. None when nothing is. `where` says what makes the
    pairs (the device, the Ray workers); `shard`, which shard's ledger this is (None: OUT's own)."""
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
