"""Per-style networks under Ray: a style's network trained on one actor, a chunk a call, while the
other actors make other styles' pairs.

The driver's `training.Trainer` does what a local worker's does: it takes the style's claim (the file
every worker and shard on OUT shares, kept alive by its heartbeat thread while an actor trains), and its
session writes each chunk's returned state as the checkpoint. An actor trains a chunk (training.train_chunk:
at most checkpoint_s seconds, the photos read by path) and sends back the state and the curve rows. A
call of a style whose network is not there yet waits on its actor (`parked`, its claims held); once the
model is done, its state goes to the object store once and each actor loads it on its first pair of the
style (by model recipe; a restarted actor loads it again). A training whose actor is lost lets its claim
go and goes on from its last checkpoint on another actor that has pairs waiting for it (or in the next run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator

from ...batch.ledger import Row
from ...errors import PairError
from .. import training
from ..backend import Event, Lost, failed

if TYPE_CHECKING:
    from .backend import RayBackend, _Actor, _Call


@dataclass
class _Training:
    """A style's network training on an actor: under this driver's claim (`t`), its session fed a chunk
    at a time; `row`, one of the style's rows (what the actor makes the training's job of)."""

    t: training.Training
    steps: Generator
    slot: "_Actor"
    row: Row
    chunk: training.Chunk


class Networks:
    """The Ray backend's networks: which calls wait for one, the trainings in flight, the models done."""

    def __init__(self, backend: "RayBackend", trainer: training.Trainer):
        self.b, self.trainer = backend, trainer
        self.trainings: dict[str, _Training] = {}  # style -> its training on one of our actors
        self.models: dict[str, tuple[str, list]] = {}  # style -> (model recipe, [its state's object ref])
        self.elsewhere: dict[str, float] = {}  # style trained by another worker on OUT -> when to look again

    def method(self, r: Row) -> str:
        return self.trainer.methods.get((r.content, r.style), "optimize")

    def waits(self, rows: list[Row]) -> bool:
        """Whether these rows need their style's network, not there yet."""
        return rows[0].style not in self.models and any(self.method(r) == "network" for r in rows)

    def park(self, slot: "_Actor", rows: list[Row]) -> None:
        """Rows of a style whose network is not there yet: they wait on `slot` while it is trained (or fail
        with its training's error)."""
        style = rows[0].style
        if style in self.trainer.failed:
            err = self.trainer.failed[style]
            self.b.backlog.append(failed(slot, rows, err.kind, str(err)))
            return
        slot.parked.append(rows)
        self.b.count(slot)
        if style in self.trainings or style in self.elsewhere:
            self.b.hooks.defer(style)  # the other actors take other styles' pairs first
        else:
            self._begin(style, slot, rows[0], self.b.hooks.may_wait(style))

    def _begin(self, style: str, slot: "_Actor", row: Row, wait: bool) -> None:
        """The style's network: there (its pairs are sent), trained by another worker (waited for, or its
        pairs go back for later, uncounted), or trained here, on `slot`, under our claim."""
        got = self.trainer.begin(style)
        if isinstance(got, dict):
            self._ready(style, got["state"])
        elif isinstance(got, str):
            if wait:
                if style not in self.elsewhere:
                    self.b.hooks.note(f"{style}: its network is being trained by {got}; waiting for it")
                self.elsewhere[style] = time.time() + min(2.0, self.b.resolved.lease_s / 4)
            else:
                self.b.hooks.defer(style)
                self._waiters(style, lambda other, rows: self.b.backlog.append(
                    Lost(other, rows, False, f"its network is being trained by {got}")))
        else:
            self.trainings[style] = _Training(got, steps := self.trainer.session(got), slot, row, next(steps))
            self._chunk(style)

    def _chunk(self, style: str) -> None:
        tr = self.trainings[style]
        ref = tr.slot.handle.train.remote(tr.row, self.b.pairs.get((tr.row.content, style)),
                                          self.trainer.styles[style].model_recipe, tr.chunk)
        self.b.push(tr.slot, self.b.call(ref, [], style))

    def chunk_back(self, slot: "_Actor", call: "_Call") -> list[Event]:
        """A training chunk came back: its checkpoint written, then the next chunk or the model is done."""
        from ray.exceptions import RayError, RayTaskError

        style = call.training
        try:
            got = self.b.ray.get(call.ref)
        except RayTaskError as e:
            got = ("error", "training", f"training the network of {style} failed on a Ray worker: {e.cause!r}")
        except RayError as e:
            return self.b.lose(slot, type(e).__name__)
        self.b.pop(slot)
        tr = self.trainings[style]
        try:
            if got[0] == "error":
                raise PairError(got[1], got[2])
            tr.chunk = tr.steps.send(got[1:])
        except StopIteration as done:
            self.end(style)
            self._ready(style, done.value["state"])
            return []
        except training.TRAINING_ERRORS as e:
            self.end(style)
            err = self.trainer.fail(style, e)
            self._waiters(style, lambda other, rows: self.b.backlog.append(failed(other, rows, err.kind, str(err))))
            return []
        self._chunk(style)
        return []

    def end(self, style: str) -> None:
        """The training over (done, failed, its actor lost, the run interrupted): its claim let go."""
        tr = self.trainings.pop(style)
        tr.steps.close()
        tr.t.close()

    def restart(self, style: str) -> None:
        """A training whose actor was lost goes on from its checkpoint on an actor whose pairs wait for it."""
        if (found := self._waiting_on(style)) is not None:
            self._begin(style, *found, wait=True)

    def _ready(self, style: str, state: dict) -> None:
        """The model is done: into the object store once; the calls waiting for it are sent."""
        self.models[style] = (self.trainer.styles[style].model_recipe, [self.b.ray.put(state)])
        self.elsewhere.pop(style, None)
        self._waiters(style, self.b.send)

    def _waiters(self, style: str, then) -> None:
        """`then(slot, rows)` for each call parked for `style`'s network, taken off its slot."""
        for slot in self.b.slots:
            for rows in [r for r in slot.parked if r[0].style == style]:
                slot.parked.remove(rows)
                self.b.count(slot)
                then(slot, rows)

    def _waiting_on(self, style: str) -> tuple["_Actor", Row] | None:
        """A ready actor with a call waiting for `style`'s network, and a row of that call."""
        for slot in self.b.slots:
            for rows in slot.parked if slot.ready else ():
                if rows[0].style == style:
                    return slot, rows[0]
        return None

    def look_again(self, now: float) -> None:
        """Styles whose network another worker trains: finished, or its claim lapsed (then trained here)."""
        for style, at in list(self.elsewhere.items()):
            found = self._waiting_on(style)
            if found is None:
                del self.elsewhere[style]  # nothing waits for it now
            elif now >= at:
                del self.elsewhere[style]
                self._begin(style, *found, wait=True)

    def close(self) -> None:
        for style in list(self.trainings):  # the run ends (interrupted): the claims let go, the checkpoints stay
            self.end(style)
