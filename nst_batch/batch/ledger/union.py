"""Every ledger of an output folder read as one: the unsharded run's, or each shard's (LedgerSet).

A shard's ledger (OUT/shards/K-of-N/ledger.sqlite, see shards.py) is in rollback-journal mode:
WAL needs shared memory between the processes, which a network filesystem does not give. `status`,
`report` and `retry` read them all through `open_ledgers`. Each reader of Ledger is forwarded by one
rule, `_Union`: ask every part, make its rows' ids the union's, merge the answers as the reader says.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

from ..shards import Shard, found
from .ledger import Ledger
from .schema import Row


def _by_id(got: list[list[Row]]) -> list[Row]:
    return sorted(chain.from_iterable(got), key=lambda r: r.id)


def _top(got: list[list[Row]], column: str, n: int) -> list[Row]:
    return sorted(chain.from_iterable(got), key=lambda r: (-getattr(r, column), r.id))[:n]


def _joined(got: list[list]) -> list:
    return list(chain.from_iterable(got))


def _summed(got: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in got:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _first_per_key(got: list[dict]) -> dict:
    """One dict; a key several parts have keeps the first part's."""
    merged: dict = {}
    for part in reversed(got):
        merged |= part
    return merged


def _latest_per_key(got: list[dict[str, dict]]) -> dict[str, dict]:
    """Each style's model as the part that recorded it last says (its updated_at; a tie: the first part's).
    Every shard records the one network of OUT/models in its own ledger when it trains or loads it, so the
    latest record is the furthest the training got: a shard that trained part of it and stopped still
    holds its older step."""
    merged: dict[str, dict] = {}
    for part in got:
        for style, m in part.items():
            if style not in merged or m["updated_at"] > merged[style]["updated_at"]:
                merged[style] = m
    return merged


def _first_set(got: list, key: str, default: Any = None) -> Any:
    """The first part's value that is set (every shard of one manifest stores the same settings)."""
    return next((v for v in got if v is not None), default)


def _first_given(got: list[dict]) -> dict:
    return next((d for d in got if d), {})


def _seconds(got: list[tuple[list[float], float | None, float | None]]):
    firsts = [first for _, first, _ in got if first is not None]
    lasts = [last for _, _, last in got if last is not None]
    return [s for secs, _, _ in got for s in secs], min(firsts, default=None), max(lasts, default=None)


class _Union:
    """A reader of Ledger, on a LedgerSet: asks each part (its rows' ids made the union's, with
    `rows`) and merges the answers with `merge(answers, *args, **kwargs)`. `ask` names the arguments
    a part is given when they differ from the caller's (None: the same)."""

    def __init__(self, merge: Callable[..., Any], rows: bool = False, ask: Callable[..., tuple] | None = None):
        self.merge, self.rows, self.ask = merge, rows, ask

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = f"Ledger.{name} of every part, merged by {self.merge.__name__}."

    def __get__(self, union: LedgerSet | None, owner: type | None = None):
        if union is None:
            return self

        def read(*args, **kwargs):
            part_args = self.ask(*args, **kwargs) if self.ask else args
            part_kwargs = {} if self.ask else kwargs
            got = []
            for shard, led in union.parts:
                answer = getattr(led, self.name)(*part_args, **part_kwargs)
                got.append(union.global_ids(shard, answer) if self.rows else answer)
            return self.merge(got, *args, **kwargs)

        read.__name__ = read.__qualname__ = self.name
        read.__doc__ = self.__doc__
        return read


class LedgerSet:
    """Every ledger of an output folder read as one: the unsharded run's, or each shard's. Read-only.

    The read methods of `Ledger` that `status` and the report use. Ids are made unique across
    shards (local id x N + K), so a row's id names it in the union but not in its shard's ledger."""

    def __init__(self, parts: list[tuple[Shard | None, Ledger]]):
        self.parts = parts
        self.shards = [s for s, _ in parts if s is not None]

    rows = _Union(_by_id, rows=True)
    failed_rows = _Union(_by_id, rows=True)
    top_done = _Union(_top, rows=True)
    outputs = _Union(_joined)
    live_workers = _Union(_joined)
    counts = _Union(_summed)  # each part counts every state, 0 included
    method_counts = _Union(_summed)
    done_seconds = _Union(_seconds)
    methods = _Union(_first_per_key)  # a pair lives in one shard: no key is in two parts
    models = _Union(_latest_per_key)
    pair_models = _Union(_first_per_key)
    made_counts = _Union(_summed)
    stored_settings = _Union(_first_given)
    # Each part is asked without the default, so an unset key is told from a set one.
    get_meta = _Union(_first_set, ask=lambda key, default=None: (key,))

    @staticmethod
    def global_ids(shard: Shard | None, rows: list[Row]) -> list[Row]:
        """A shard's rows with their union ids (the unsharded ledger's ids are the union's)."""
        return rows if shard is None else [replace(r, id=r.id * shard.count + shard.index) for r in rows]

    def curves(self, ids: Iterable[int]) -> dict[int, str]:
        """Ledger.curves by union id: each part is asked for its own ids of those."""
        ids = list(ids)
        got: dict[int, str] = {}
        for shard, led in self.parts:
            if shard is None:
                got |= led.curves(ids)
                continue
            mine = {i // shard.count: i for i in ids if i % shard.count == shard.index}
            got |= {mine[local]: c for local, c in led.curves(mine).items()}
        return got

    @property
    def folders(self) -> list[Path]:
        """The folder of each ledger: its loss log (losslog.LOSS_LOG) lies beside it."""
        return [led.path.parent for _, led in self.parts]

    def close(self) -> None:
        for _, led in self.parts:
            led.close()

    def __enter__(self) -> LedgerSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_ledgers(out: Path) -> LedgerSet:
    """All ledgers of OUT, read-only: OUT/ledger.sqlite, or every OUT/shards/K-of-N/ledger.sqlite.
    ConfigError when there is none."""
    shards = found(out)
    if not shards:
        return LedgerSet([(None, Ledger(out, readonly=True))])
    parts: list[tuple[Shard | None, Ledger]] = []
    try:
        for s in shards:
            parts.append((s, Ledger(s.folder(out), readonly=True)))
    except BaseException:
        LedgerSet(parts).close()
        raise
    return LedgerSet(parts)
