"""The end of a claim, recorded (done or failed), and a style's trained network (table models).

A claim's end counts only while the claim is still this worker's: a worker whose lease ran out (a
stopped process) may find its pair reset and made by another, and its late news must not overwrite
what that one recorded.
"""

from __future__ import annotations

import json
import time
from dataclasses import KW_ONLY, dataclass

from .connection import Connection
from .schema import State

_RUNNING = f"state='{State.RUNNING}'"


@dataclass(frozen=True)
class Finished:
    """A pair made: what `done` records. `recipe`: the one it was claimed under (None: not checked);
    `finished_at`: now if None; `seconds`: the time since the claim if None (give the compute time of
    a pair that waited in a queue); `curve`: its loss curve as losslog.curve_record makes it (a small
    JSON list); `method`: what made it (optimize, network); `model`: for a network, the recipe of the
    model that made it (methods.model_recipe), None otherwise."""

    pair_id: int
    worker: str
    steps: int
    content_loss: float
    style_loss: float
    tv_loss: float
    total_loss: float
    _: KW_ONLY
    recipe: str | None = None
    note: str | None = None
    finished_at: float | None = None
    seconds: float | None = None
    curve: str | None = None
    method: str = "optimize"
    model: str | None = None


# The fields of Finished stored in the pairs columns of the same name.
_DONE_COLUMNS = ("steps", "content_loss", "style_loss", "tv_loss", "total_loss", "note", "curve", "method",
                 "model")
_DONE_SETS = f"state='{State.DONE}', " + ", ".join(f"{c}=?" for c in _DONE_COLUMNS)


class Finish(Connection):
    def done(self, made: Finished) -> bool:
        """Mark done a pair this worker made with `made.recipe` (the recipe it claimed the pair under).
        False when the claim is no longer this worker's or the pair's recipe has changed since."""
        return self._finish(made.pair_id, made.worker, _DONE_SETS, tuple(getattr(made, c) for c in _DONE_COLUMNS),
                            made.finished_at, made.recipe, made.seconds)

    def fail(self, pair_id: int, worker: str, kind: str, message: str, note: str | None = None) -> None:
        self._finish(pair_id, worker, f"state='{State.FAILED}', error_kind=?, error_message=?, note=?",
                     (kind, message, note))

    def _finish(self, pair_id: int, worker: str, sets: str, args: tuple, finished_at: float | None = None,
                recipe: str | None = None, seconds: float | None = None) -> bool:
        """Record the end of a claim that is still this worker's (and, given `recipe`, still for that
        recipe); False, recording nothing, when it is not: its lease ran out and the pair was reset.
        `seconds` defaults to the time since the claim."""
        now = finished_at or time.time()
        with self._tx():
            cur = self.db.execute(
                f"UPDATE pairs SET {sets}, finished_at=?, seconds=COALESCE(?, ? - started_at), heartbeat=NULL "
                f"WHERE id=? AND worker=? AND {_RUNNING} AND recipe=COALESCE(?, recipe)",
                (*args, now, seconds, now, pair_id, worker, recipe))
            if cur.rowcount == 1:
                return True
            if recipe is not None:
                # Our image may have just replaced the file of a worker that has since made this pair
                # with another recipe and recorded it done: that file is no longer what its recipe says.
                self.db.execute(f"UPDATE pairs SET state='{State.PENDING}', worker=NULL, heartbeat=NULL "
                                f"WHERE id=? AND state='{State.DONE}' AND recipe != ?", (pair_id, recipe))
            return False

    def set_model(self, style: str, recipe: str, step: int, steps: int, curve: str | None = None,
                  photos: list[str] | None = None) -> None:
        """Record a style's network after its checkpoint is on disk (training.Trainer), with the photos it
        trains on (names). A later checkpoint given no curve keeps the one stored for the same recipe."""
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO models (style, recipe, step, steps, updated_at, curve, photos, "
                            "trained_on) VALUES (?, ?, ?, ?, ?, COALESCE(?, (SELECT curve FROM models WHERE style=? "
                            "AND recipe=?)), ?, ?)",
                            (style, recipe, step, steps, time.time(), curve, style, recipe,
                             None if photos is None else len(photos), None if photos is None else json.dumps(photos)))

    def forget_model(self, style: str) -> int:
        """`nst-batch retrain`: the style's model forgotten and the pairs its network made back to pending (the
        next run trains afresh and makes them again); how many pairs that is."""
        with self._tx():
            self.db.execute("DELETE FROM models WHERE style=?", (style,))
            return self.db.execute(f"UPDATE pairs SET state='{State.PENDING}', worker=NULL, heartbeat=NULL "
                                   f"WHERE style=? AND state='{State.DONE}' AND method='network'", (style,)).rowcount
