"""The run ledger: OUT/ledger.sqlite, what is done, failed, running or still to do.

SQLite in WAL mode: readers (`status`, `report`) never block a worker, every change is one short
transaction, and `kill -9` at any moment leaves the last committed state. Several workers share one
ledger: a pair is claimed atomically and held by a heartbeat (claims.py); each worker registers the
settings it makes pixels with, and one with other settings is refused while one is live (workers.py).

Sized for whole collections (10,000 photos x 20 styles = 200,000 pairs): a claim is an indexed
`ORDER BY id LIMIT` query, the same cost whatever the ledger holds; `sync` of an unchanged plan writes
nothing (sync.py); `status` reads aggregates, not rows (reads.py); input hashes are kept so an
unchanged file is not read again (hashes.py).

A shard's ledger (OUT/shards/K-of-N/ledger.sqlite, see shards.py) is in rollback-journal mode instead
(journal_mode=DELETE, synchronous=FULL): WAL needs shared memory between the processes, which a
network filesystem does not give, and a shard has one writer host. `open_ledgers` reads all of an
output folder's ledgers as one (`LedgerSet`, union.py), for `status`, `report` and `retry`.

The tables and their migrations are in schema.py, each column of `pairs` declared once.
"""

from .claims import Accept, Recipes
from .connection import FILENAME
from .finish import Finished
from .ledger import Ledger
from .schema import COLUMNS, SCHEMA_VERSION, STATES, Row, State
from .sync import output_exists
from .union import LedgerSet, open_ledgers
from .workers import worker_id

__all__ = ["Accept", "COLUMNS", "FILENAME", "SCHEMA_VERSION", "STATES", "Finished", "Ledger", "LedgerSet", "Recipes", "Row",
           "State", "open_ledgers", "output_exists", "worker_id"]
