"""The Ray backend: the same run over every GPU of a Ray cluster (`nst-batch run --ray ...`).

Ray Core only. One actor (`EngineWorker`) per GPU holds one `engine.Engine` (VGG19 loaded once, its
own style-target cache) and turns jobs into records: encoded images and loss rows. It reads the photos
by path, so only the inputs must be visible to every node. This process alone touches OUT: the drive
(run/drive.py) claims, writes the images and the loss log and records every end, as in a local run.
Each actor is a slot that keeps one style while that style has pairs, with at most `queue` calls
outstanding (one computing, the next waiting, so no round trip is lost between pairs).

A style's network (method network, or auto) is trained on one actor, a chunk a call (training.Trainer's
session: this process holds the style's claim, the same file every worker and shard on OUT uses, and
writes each chunk's state as the checkpoint); pairs of that style wait on their actors (`parked`) meanwhile,
and the other actors make other styles' pairs. The finished state goes to the object store once; each
actor loads it (by model recipe) on its first pair of that style, and again after a restart.

An actor that dies (or is killed by the drive for running past pair_timeout_s) fails its calls in order:
the first was computing, those behind it only queued (`RayBackend.lose`); Ray restarts it, and it gets pairs again
once it answers `ready` with this run's settings. A killed driver leaves its claims to a dead local PID,
which the next driver takes over at once; a second driver on the same OUT is refused (`DRIVER_LOCK`).

Here: `run_ray`. The actor is actor.py's, the backend (the slots, their calls, lost actors) backend.py's,
the networks trained on actors networks.py's, connecting and starting the actors setup.py's.
"""

from __future__ import annotations

import os

from ...batch.shards import check_layout
from ...config.manifest import Settings
from .. import training
from ..backend import Backend
from ..drive import RunResult
from ..options import RayOptions
from ..progress import Display
from ..session import absolute_paths, plan_for, work_through
from .actor import EngineWorker
from .backend import RayBackend
from .setup import DRIVER_LOCK, INSTALL_HINT, connect, import_ray, lock_out, start

__all__ = ["DRIVER_LOCK", "INSTALL_HINT", "EngineWorker", "RayBackend", "import_ray", "run_ray"]


def run_ray(settings: Settings, display: Display, options: RayOptions, only_failed_kinds: list[str] | None = None,
            retry: bool = False) -> RunResult:
    """`local.run` with Ray actors computing the pairs. Raises ConfigError (exit 2) without Ray, when
    the cluster cannot be reached or has nothing to run on, or when another driver holds OUT."""
    ray = import_ray()
    check_layout(settings.out, None)  # a sharded OUT is not a Ray driver's: refused before anything starts
    settings = absolute_paths(settings)  # actors run elsewhere: the paths they are sent must not be relative
    lock = lock_out(settings.out) if settings.out.is_dir() else None  # a second driver: refused before any start
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (0 if settings.device == "cpu" else 1)
    # A CPU actor computes on its CPU, whatever `device: auto` would find on its node.
    actor_settings = settings if gpus else settings.replace(device="cpu")
    try:
        connect(ray, options.address)
        try:
            slots, resolved, device, new_actor = start(ray, actor_settings, gpus, options)
            plan, hashes = plan_for(resolved)
            lock = lock if lock is not None else lock_out(settings.out)

            def backend(ledger, folder, work, styles, methods) -> Backend:
                trainer = training.Trainer(folder, ledger, None, styles, methods, None, display.note, settings=resolved)
                return RayBackend(ray, slots, new_actor, resolved, work.pairs, options, device.partition(":")[0],
                                  trainer)

            return work_through(settings, resolved, plan, hashes, display, backend,
                                where=f"{len(slots)} Ray worker(s) ({device})", device_type=device.partition(":")[0],
                                only_failed_kinds=only_failed_kinds, retry=retry, pair_timeout_s=options.pair_timeout_s)
        finally:
            ray.shutdown()  # a cluster started here stops; on a shared one, this job's actors end
    finally:
        if lock is not None:
            os.close(lock)
