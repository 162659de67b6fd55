"""The report's work spread over the machine's cores: forked worker processes where that is safe.

A collection's report is mostly Python work (200,000 cards, charts and small thumbnails), which threads
cannot share out under the GIL. Forked children can, and they inherit what the parent read from the
ledger instead of being sent it (pickling 200,000 rows would cost more than it saves). Forking is safe
only while this process runs no other thread (at the end of `nst-batch run` a heartbeat may still be
going, and a lock it held mid-use would be copied locked) and where there is fork at all.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence


def workers() -> int:
    return os.cpu_count() or 1


def can_fork() -> bool:
    return (workers() > 1 and threading.active_count() == 1
            and "fork" in multiprocessing.get_all_start_methods())


_SHARED: Any = None  # what the children inherit (set just before they are forked)


def shared() -> Any:
    return _SHARED


def fork_map(fn: Callable[[Any], Any], parts: Sequence[Any], inherit: Any = None) -> list[Any]:
    """fn(part) for every part, in forked worker processes, in order; `inherit` is there for the
    children as `shared()`. Call only where can_fork()."""
    global _SHARED
    _SHARED = inherit
    try:
        with ProcessPoolExecutor(max_workers=workers(), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(fn, parts))
    finally:
        _SHARED = None
