"""The Ray backend: each actor a slot, its calls in the order Ray runs them, a lost actor's calls settled."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ...batch.ledger import Row
from ...batch.plan import Pair
from ...config.manifest import Settings
from ...errors import ConfigError
from .. import training
from ..backend import Backend, Event, Returned, Lost, Slot, failed
from ..options import RayOptions
from .networks import Networks
from .setup import check


@dataclass
class _Call:
    ref: Any
    rows: list[Row]
    training: str | None = None  # a chunk of this style's training (no rows)


@dataclass(eq=False)
class _Actor(Slot):
    """One actor as a slot: its calls in order (the first one is computing) and, while Ray restarts
    it (ready False), the readiness call it is waited on with."""

    handle: Any = None
    pending: deque[_Call] = field(default_factory=deque)
    ping: Any = None  # a `ready` call in flight: not given pairs until it answers
    ping_at: float = 0.0  # when to send the next `ready` (the actor said it is still restarting)
    parked: list[list[Row]] = field(default_factory=list)  # calls of a network style waiting for its model


class RayBackend(Backend):
    looks_ahead = False

    def __init__(self, ray, slots: list[_Actor], new_actor, resolved: Settings, pairs: dict[tuple[str, str], Pair],
                 options: RayOptions, device_type: str, trainer: training.Trainer):
        self.ray, self.slots, self.new_actor, self.resolved, self.pairs = ray, slots, new_actor, resolved, pairs
        self.device_type = device_type  # the actors' (all alike): what `batch: auto` may claim for one call
        self.options, self.queue = options, options.queue
        self.by_ref: dict[Any, _Actor] = {}  # every call and `ready` in flight -> its actor
        self.backlog: list[Event] = []  # what a cancel settled, for the next poll
        self.idle_since: float | None = None
        self.trainer = trainer
        self.nets = Networks(self, trainer)

    def start(self, hooks) -> None:
        super().start(hooks)
        self.trainer.loss_log, self.trainer.note = hooks, hooks.note  # the drive's loss log and display

    def most_per_call(self, settings: Settings) -> int:
        """`batch: auto` on the actors' device type: 1 on CPU actors (a call of 64 pairs made one by one could
        outlast pair_timeout_s), settings.AUTO_BATCH_MAX on GPUs (each actor batches what fits)."""
        if settings.batch == "auto" and self.device_type != "cuda":
            return 1
        return super().most_per_call(settings)

    def submit(self, slot: _Actor, rows: list[Row]) -> None:
        if self.nets.waits(rows):
            self.nets.park(slot, rows)  # its network is not there yet: trained first
        else:
            self.send(slot, rows)

    def send(self, slot: _Actor, rows: list[Row]) -> None:
        """A `make` call: each row with the method it was claimed for, and its style's model if it has one."""
        claimed = [(r, self.pairs.get((r.content, r.style)), self.nets.method(r)) for r in rows]
        self.push(slot, _Call(slot.handle.make.remote(claimed, self.nets.models.get(rows[0].style)), rows))

    call = _Call

    def push(self, slot: _Actor, call: _Call) -> None:
        if not slot.pending:
            slot.busy_since = time.time()
        slot.pending.append(call)
        self.by_ref[call.ref] = slot
        self.count(slot)

    @staticmethod
    def count(slot: _Actor) -> None:
        slot.calls = len(slot.pending) + len(slot.parked)

    def poll(self, timeout: float) -> list[Event]:
        events, self.backlog = self.backlog, []
        now = time.time()
        for slot in self.slots:
            if not slot.ready and slot.ping is None and now >= slot.ping_at:
                slot.ping = slot.handle.ready.remote()
                self.by_ref[slot.ping] = slot
        self._waiting(now)
        self.nets.look_again(now)
        # Only the first call of each actor can finish first (Ray runs them in order), and `ready`s.
        heads = [s.pending[0].ref for s in self.slots if s.pending] + [s.ping for s in self.slots if s.ping is not None]
        if not heads:
            if not events:
                time.sleep(timeout)
            return events
        ready, _ = self.ray.wait(heads, num_returns=1, timeout=timeout)
        for ref in ready:
            slot = self.by_ref.pop(ref, None)
            if slot is None:  # settled by a lose() of this poll
                continue
            if ref == slot.ping:
                self._answered(slot)
                continue
            if not slot.pending or slot.pending[0].ref != ref:
                continue  # settled already
            if slot.pending[0].training is not None:
                events += self.nets.chunk_back(slot, slot.pending[0])
                continue
            end, why = self._outcome(slot, slot.pending[0])
            if end is None:
                events += self.lose(slot, why)
                continue
            self.pop(slot)
            events.append(end)
        return events

    def pop(self, slot: _Actor) -> None:
        slot.pending.popleft()
        self.count(slot)
        slot.busy_since = time.time() if slot.pending else None  # the next call begins now

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

    def lose(self, slot: _Actor, why: str) -> list[Event]:
        """The actor died or was killed: its calls in order; the first that did not finish was computing."""
        events: list[Event] = []
        computing, lost = True, []
        while slot.pending:
            call = slot.pending.popleft()
            self.by_ref.pop(call.ref, None)
            if call.training is not None:  # its claim let go: trained on from its checkpoint on another actor
                self.nets.end(call.training)
                lost.append(call.training)
                computing = False
                continue
            end, _ = self._outcome(slot, call, timeout=60)
            events.append(end if end is not None else Lost(slot, call.rows, computing, why))
            computing = end is not None  # after a finished call, the next one was the one computing
        events += [Lost(slot, rows, False, why) for rows in slot.parked]  # never began
        slot.style, slot.ready, slot.ping, slot.ping_at, slot.parked = None, False, None, time.time(), []
        slot.calls, slot.busy_since = 0, None
        for style in lost:
            self.nets.restart(style)
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
        check(answer, self.resolved)
        slot.ready = True

    def cancel(self, slot: _Actor, why: str) -> None:
        """Hung: kill it; Ray restarts it, and its calls fail into lose()."""
        self.ray.kill(slot.handle, no_restart=False)
        self.backlog += self.lose(slot, why)

    def lost_text(self, times: int, why: str) -> str:
        return f"its Ray worker was lost {times} times (last: {why}); see the Ray logs"

    def close(self) -> None:
        self.nets.close()
