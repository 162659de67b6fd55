"""The driver's side of learned per-style networks: the checkpoints under OUT/models/ (every shard's and
every worker's), written and claimed here whoever trains; which method makes each pair and the recipes
are batch/methods.py's.

The engine trains from a state dict and returns one; `Trainer` is what reads and writes the .pt files,
atomically, every CHECKPOINT_S seconds of training and at its end, and records each model in the ledger
(table models). A chunk of training (`train_chunk`) runs where an engine is: in this process (the local
backend) or on a Ray actor, the Ray driver feeding `Trainer.session` what each chunk returns. A model is
an artefact of its own: its recipe covers what defines the style's look, the training settings and the
architecture, and NOT the photos it trains on (an even sample of the photos pending when it was first
trained, recorded with it). Adding or removing photos therefore never retrains a network nor redoes a pair
it made; changing the style or the objective does. `nst-batch retrain` asks for a network trained afresh
on the collection as it is now.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import torch

from ..core import network
from ..core.engine import Engine, Job
from ..errors import ConfigError, PairError
from ..files.layout import MODELS, write_atomic
from ..files.stage import load_photo
from ..batch import shards
from ..batch.training_claim import TrainingClaim
from ..batch.ledger import Ledger
from ..files.losslog import LossLog, curve_record
from ..config.manifest import Settings
from ..core.optimize import LogRow
from ..batch.methods import StyleMethod

CHECKPOINT_S = 300.0  # seconds of training between checkpoints
TRAINING = "(training)"  # the content column of a training curve's rows in losses.csv


class WindowMean:
    """A training curve's row every `every` steps (and at step `last`): the mean (content, style, tv) of
    the steps since the row before, not the last step's alone. Each step's loss is on crops of its own,
    and crops differ up to 6x in loss (network.held_crops): single steps draw noise, not the trend."""

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last
        self.sums, self.n = [0.0, 0.0, 0.0], 0

    def add(self, step: int, content: float, style: float, tv: float) -> tuple[float, float, float] | None:
        self.sums = [a + b for a, b in zip(self.sums, (content, style, tv))]
        self.n += 1
        if step % self.every and step != self.last:
            return None
        mean = tuple(v / self.n for v in self.sums)
        self.sums, self.n = [0.0, 0.0, 0.0], 0
        return mean  # type: ignore[return-value]


class TrainingElsewhere(Exception):
    """Another worker holds the claim on training this style's network (Trainer.ensure with wait=False)."""


@dataclass(frozen=True)
class _Named:
    content: str
    style: str


@dataclass(frozen=True)
class Chunk:
    """One stretch of a style's training, as its trainer (this process, a Ray actor) is asked for it: from
    `state` (None: afresh) on `photos` ((name, path): they go by path) up to step `until`, pausing for a
    checkpoint after `seconds`; `elapsed`: the training's seconds before it (its curve's time axis)."""

    style: str
    photos: tuple[tuple[str, str], ...]
    state: dict | None
    until: int
    seconds: float
    elapsed: float


def train_chunk(engine: Engine, job: Job, chunk: Chunk, decoded: dict) -> tuple[dict, list[LogRow], list]:
    """A chunk trained wherever the engine is: (the new state, its curve rows, the photos it trained on).
    `decoded`: the photos decoded by an earlier chunk (path -> tensor, None: undecodable), kept by the caller.
    An unreadable photo fails its own pairs; the network trains on the others."""
    s = engine.settings
    photos, used = [], []
    for name, p in chunk.photos:
        if p not in decoded:
            try:
                decoded[p] = load_photo(Path(p), s.size, s.max_megapixels)[0]  # at the working size, on the CPU
            except PairError:
                decoded[p] = None
        if decoded[p] is not None:
            photos.append(decoded[p])
            used.append((name, p))
    if not photos:
        raise PairError("training", f"no photo of {chunk.style} could be decoded to train its network on")
    rows: list[LogRow] = []
    t0, px = time.perf_counter() - chunk.elapsed, min(network.CROP_MAX, s.size)
    window = WindowMean(s.log_every, chunk.until)

    def on_loss(step: int, terms) -> None:
        mean = window.add(step, *(float(t.mean()) for t in (terms.content, terms.style, terms.tv)))
        if mean is not None:
            rows.append(LogRow(step, px, *mean, sum(mean), time.perf_counter() - t0))

    since = time.monotonic()
    state = engine.train(job, photos, chunk.state, chunk.until, on_loss,
                         lambda step: time.monotonic() - since >= chunk.seconds)
    return state, rows, used


def training_error(style: str, e: BaseException) -> PairError:
    """What a failed training fails its style's network pairs with (kind `training`)."""
    return e if isinstance(e, PairError) else PairError("training", f"training the network of {style} failed: {e}")


TRAINING_ERRORS = (PairError, FloatingPointError, ValueError, RuntimeError)  # a training that fails its style


@dataclass
class Training:
    """A style's network to train under this worker's claim (Trainer.begin), from checkpoint `ck` (None:
    afresh). Whoever trains it releases the claim (`close`) once done, failed or lost."""

    style: str
    sm: StyleMethod
    path: Path
    ck: dict | None
    claim: TrainingClaim

    def close(self) -> None:
        self.claim.release()


class Trainer:
    """Trains (or loads) a style's network when its first network pair comes up, with checkpoints. The
    checkpoints, the claim and the ledger are this process's; a chunk of training is the engine's, here
    (`_train`, the local backend) or on a Ray actor (`session` driven by the Ray backend)."""

    def __init__(self, folder: Path, ledger: Ledger, engine: Engine | None, styles: dict[str, StyleMethod],
                 methods: dict[tuple[str, str], str], loss_log: LossLog, note: Callable[[str], None],
                 checkpoint_s: float | None = None, settings: Settings | None = None):
        self.folder, self.ledger, self.engine, self.styles = folder, ledger, engine, styles
        self.s: Settings = settings if settings is not None else engine.settings  # type: ignore[union-attr]
        self.loss_log, self.note = loss_log, note
        self.checkpoint_s = CHECKPOINT_S if checkpoint_s is None else checkpoint_s
        self.methods = methods
        self.failed: dict[str, PairError] = {}

    def job(self, job: Job) -> Job:
        """`job` with the method its row was claimed for and, for a network, its model's recipe (what the
        pair's recipe covers, and what the engine keeps the model by)."""
        method = self.methods.get((job.content, job.style), "optimize")
        model = self.styles[job.style].model_recipe if method == "network" else None
        return dataclasses.replace(job, method=method, model=model)

    def ensure(self, job: Job, wait: bool = True) -> None:
        """The style's network in the engine: loaded from its checkpoint, trained on from it, or trained
        afresh. PairError('training') if it cannot be (the style's network pairs fail with it). While another
        worker trains it: waited for, or (wait=False) TrainingElsewhere, so the pair can wait its turn."""
        if self.engine.has_model(job):
            return
        if job.style in self.failed:
            raise self.failed[job.style]
        try:
            self._ensure(job, wait)
        except TRAINING_ERRORS as e:
            raise self.fail(job.style, e) from None

    def fail(self, style: str, e: BaseException) -> PairError:
        """The style's training failed: its network pairs fail with this, for the rest of the run."""
        self.failed[style] = training_error(style, e)
        return self.failed[style]

    def _ensure(self, job: Job, wait: bool) -> None:
        waiting = False
        while not isinstance(got := self.begin(job.style), dict):
            if isinstance(got, Training):
                t = got
                try:
                    got = self._train(job, t.sm, t.path, t.ck)
                finally:
                    t.close()
                break
            if not wait:
                raise TrainingElsewhere(f"{job.style}: its network is being trained by {got}")
            if not waiting:
                self.note(f"{job.style}: its network is being trained by {got}; waiting for it")
                waiting = True
            time.sleep(min(2.0, self.s.lease_s / 4))
        self.engine.load_model(job, got["state"])

    def begin(self, style: str) -> dict | Training | str:
        """The style's finished checkpoint (this ledger learns of it); or, under this worker's claim now, the
        Training to do; or, while another worker holds the claim, its name. One trainer a style among every
        worker and shard on OUT (the claim file beside its model); the others wait for its model."""
        sm = self.styles[style]
        path = self.s.out / sm.model_file  # OUT's: one model a style, whichever shard or worker makes its pairs
        ck = self._load(path, sm.model_recipe)
        if ck is None or ck["state"]["step"] < self.s.network_steps:
            claim = TrainingClaim(path, self.s.lease_s)
            if not claim.take():
                return claim.holder() or "another worker"
            # Read again: the one before us may have checkpointed, or finished, since.
            ck = self._load(path, sm.model_recipe)
            if ck is None or ck["state"]["step"] < self.s.network_steps:
                return Training(style, sm, path, ck, claim)
            claim.release()
        known = self.ledger.models().get(style, {})
        if known.get("recipe") != sm.model_recipe or known.get("step") != ck["state"]["step"]:
            self._record(sm, ck)  # trained by an earlier run or another worker: this ledger learns of it
        return ck

    @staticmethod
    def _load(path: Path, recipe: str) -> dict | None:
        """The checkpoint at `path` if it is one of `recipe`: {recipe, state, photos, curve}. The file is
        what says what a model is (a shard's or another worker's ledger may not know of it yet)."""
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file: trained afresh
            return None
        if d.get("recipe") != recipe or d.get("state", {}).get("arch") != network.ARCH_VERSION:
            return None  # one of another recipe (its style or objective changed): trained afresh, and replaced
        d.setdefault("photos", [])
        d.setdefault("curve", [])
        return d

    def _train(self, job: Job, sm: StyleMethod, path: Path, ck: dict | None) -> dict:
        """The training in this process, chunk after chunk, on this engine."""
        steps, decoded = self.session(Training(job.style, sm, path, ck, None)), {}  # type: ignore[arg-type]
        chunk = next(steps)
        while True:
            try:
                chunk = steps.send(train_chunk(self.engine, job, chunk, decoded))
            except StopIteration as done:
                return done.value

    def session(self, t: Training) -> Generator[Chunk, tuple, dict]:
        """A training as chunks: yields each Chunk to train, is sent what training it gave (state, curve
        rows, photos used), writes it as the checkpoint; returns the last checkpoint. A network trained on
        from its checkpoint keeps the photos it started with: the same model, however the collection has
        changed since."""
        s, ck = self.s, t.ck
        chosen = tuple((n, str(p)) for n, p in (ck["photos"] if ck and ck["photos"] else t.sm.photos))
        state = None if ck is None else ck["state"]
        start = 0 if state is None else int(state["step"])
        kept = [p for p in (ck["curve"] if ck else []) if p[0] <= start]
        rows: list[LogRow] = []
        t0 = time.perf_counter()
        self.note(f"{t.style}: training its network on {len(chosen)} photo(s), step {start} of {s.network_steps}"
                  f"{' (resumed from its checkpoint)' if start else ''}")
        while True:
            state, new, used = yield Chunk(t.style, chosen, state, s.network_steps, self.checkpoint_s,
                                           time.perf_counter() - t0)
            self.loss_log.write(_Named(TRAINING, t.style), 0, new)
            rows += new
            ck = self._save(t.path, t.sm, state, kept, rows, used)
            if state["step"] >= s.network_steps:
                break
            self.note(f"{t.style}: network checkpoint at step {state['step']} of {s.network_steps}")
        self.note(f"{t.style}: network trained ({s.network_steps} steps, {time.perf_counter() - t0:.0f} s)")
        return ck

    def _save(self, path: Path, sm: StyleMethod, state: dict, kept: list, rows: list[LogRow],
              photos: list[tuple[str, str]]) -> dict:
        """The checkpoint written (atomically) and recorded: weights, Adam's state, the photos it trains on
        (name, path) and its curve so far, so whoever trains on from it needs nothing else."""
        ck = {"recipe": sm.model_recipe, "state": state, "photos": [list(p) for p in photos],
              "curve": kept + json.loads(curve_record(rows) or "[]")}
        buf = io.BytesIO()
        torch.save(ck, buf)
        write_atomic(path, lambda f: f.write(buf.getvalue()))
        self._record(sm, ck)
        return ck

    def _record(self, sm: StyleMethod, ck: dict) -> None:
        self.ledger.set_model(sm.style, sm.model_recipe, int(ck["state"]["step"]), self.s.network_steps,
                              json.dumps(ck["curve"]) if ck["curve"] else None, [n for n, _ in ck["photos"]])


def retrain(out: Path, styles: list[str], dry_run: bool = False) -> list[str]:
    """`nst-batch retrain`: each named style's network (every trained one if none is named) forgotten, its
    checkpoint removed and the pairs it made back to pending, in every ledger of OUT; the next `run` trains
    it afresh on an even sample of the photos then pending (the grown collection) and makes those pairs
    again. Pairs made by optimisation stay. What it does (or would do, dry_run), a line a style. Refused
    while a worker is live on OUT: its engine holds the model being forgotten."""
    folders = [sh.folder(out) for sh in shards.found(out)] or [out]
    ledgers = [Ledger(f, create=False) for f in folders]
    try:
        live = [w for led in ledgers for w in led.live_workers()]
        if live:
            raise ConfigError(f"{out}: {live[0][0]} is still running on it; retrain once every run has ended")
        made: dict[str, int] = {}
        for led in ledgers:
            for st in set(led.models()) | set(led.network_made()):
                made[st] = made.get(st, 0) + led.network_made().get(st, 0)
        unknown = [st for st in styles if st not in made]
        if unknown:
            raise ConfigError(f"{out}: no network of style {unknown[0]!r}; trained ones: "
                              f"{', '.join(sorted(made)) or 'none'} (option --style)")
        lines = []
        for st in styles or sorted(made):
            verb = "would make" if dry_run else "will make"
            lines.append(f"{st}: network forgotten; the next run trains it afresh on the photos pending then and "
                         f"{verb} its {made[st]} network-made pair(s) again")
            if not dry_run:
                (out / MODELS / f"{st}.pt").unlink(missing_ok=True)
                for led in ledgers:
                    led.forget_model(st)
        return lines
    finally:
        for led in ledgers:
            led.close()
