"""Connecting to the Ray cluster, holding OUT for this driver, starting the actors and checking they agree."""

from __future__ import annotations

import fcntl
import logging
import os

from ...batch.ledger import worker_id
from ...batch.plan import recipe_settings
from ...config.manifest import Settings
from ...errors import ConfigError, WeightsError
from ..options import RayOptions

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'nst-batch[ray]'"
DRIVER_LOCK = ".nst-ray-driver.lock"  # in OUT: held (flock) by the one Ray driver working on it


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray



def lock_out(out) -> int:
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


def connect(ray, address: str) -> None:
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at '{address}' (--ray): {_first_line(e)}") from None


def start(ray, settings: Settings, gpus: float, options: RayOptions):
    """Create the actors and wait for each to load its engine. Returns them, the settings they resolved
    (all alike, or ConfigError: the recipe must be one), their device, and how to make another."""
    from .actor import EngineWorker
    from .backend import _Actor

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
    check(answers[0])
    resolved = answers[0][1]
    for a in answers[1:]:
        check(a, resolved, restarted=False)
    return slots, resolved, answers[0][2], new_actor


def check(answer: tuple, resolved: Settings | None = None, restarted: bool = True) -> None:
    """An actor's `ready` answer: a setup error is this run's error (weights: exit 3, else 2), and so are
    settings that resolve other pixels than `resolved` (the recipe of every pair must be one)."""
    if answer[0] == "error":
        raise (WeightsError if answer[1] == WeightsError.exit_code else ConfigError)(answer[2])
    if resolved is not None and recipe_settings(answer[1]) != recipe_settings(resolved):
        raise ConfigError("a restarted Ray worker resolves other settings than this run's (precision: another kind "
                          "of GPU?); set 'precision' in the manifest" if restarted else
                          "the Ray workers resolve different settings (precision: one GPU has bf16, another not?); "
                          "set 'precision' in the manifest")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
