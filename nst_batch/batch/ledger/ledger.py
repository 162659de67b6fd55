"""`Ledger`: one ledger file, composed of the parts each kept in its own module."""

from __future__ import annotations

from .claims import Claims
from .finish import Finish
from .hashes import Hashes
from .reads import Reads
from .sync import Sync
from .workers import Workers


class Ledger(Claims, Finish, Sync, Hashes, Workers, Reads):
    """OUT/ledger.sqlite (or a shard's), opened for a worker (created or migrated as needed) or, with
    readonly=True, for `status` and `report`. Every change is one short transaction.

    connection.Connection  opening, transactions, the last run's settings (meta)
    claims.Claims          claim, peek, heartbeat, release: the one place a pair is taken
    finish.Finish          done (a Finished record), fail, set_model
    sync.Sync              sync with a plan, requeue_failed for `retry`
    hashes.Hashes          the input-hash store (stored_hashes, store_hashes)
    workers.Workers        register, unregister, live_workers: one set of settings per folder
    reads.Reads            counts, rows, curves, methods, models...: what status and report read
    """
