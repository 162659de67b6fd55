"""`run --ray`'s options and their defaults, declared once: the CLI's option defaults read them.

Its own small module, without torch or Ray, so the CLI can read the defaults when it starts."""

from __future__ import annotations

from dataclasses import dataclass


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
