"""The driver's side of learned per-style networks: which method makes each pair, the model
and pair recipes, and the checkpoints under OUT/models/ (every shard's and every worker's).

The engine trains from a state dict and returns one; `Trainer` is what reads and writes the .pt files,
atomically, every CHECKPOINT_S seconds of training and at its end, and records each model in the ledger
(table models). A model is an artefact of its own: its recipe covers what defines the style's look (the
style's file or blend, the objective and its weights, colours, per_style settings, the engine version), the
training settings and the architecture, and NOT the photos it trains on. Those are an even sample of the
photos pending when it was first trained, recorded with it (in the checkpoint, and their count and list in
the ledger). A pair made by a network has a recipe over its model's and refine_steps. Adding or removing
photos therefore never retrains a network nor redoes a pair it made; changing the style or the objective
does. `nst-batch retrain` asks for a network trained afresh on the collection as it is now.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
from ..batch.plan import Pair, Plan, recipe_settings, style_settings

# `auto` trains a style's network only where that path is both faster and nearly as good: its measured
# loss (forward pass + the default refinement, scored like optimize's by the gatys objective at full size)
# at most LOSS_LIMIT times optimize's, and at least the break-even of pending photos, train / (optimize a
# photo - network a photo): both methods are linear in the photos, training is paid once a style.
# Measured on this CPU at 128 px (docs/benchmarks.md, "Real photos, 2026-12-06"): 24 real photos x 2
# paintings, 1 thread, the methods interleaved photo by photo: optimize 39.3 s a photo, the network + 50
# refine steps 13.5 s, training 600 steps 218 s (alone on the machine; 553-690 s beside other runs); loss
# 1.09x optimize's for The Starry Night, 1.11x for The Great Wave. The worse style counts (a user's may be
# either): 1.11 > LOSS_LIMIT, so no break-even and `auto` always optimizes. Were it within:
# 218 / (39.3 - 13.5) = 8.4, so 9 photos.
LOSS_LIMIT = 1.10


@dataclass(frozen=True)
class Measured:
    train_s: float  # training a style's network (network_steps)
    optimize_s: float  # a photo by optimize (the defaults)
    network_s: float  # a photo by the network: forward pass + the default refinement
    loss_ratio: float  # the network path's mean loss over optimize's, on the same photos


def break_even(m: Measured, loss_limit: float = LOSS_LIMIT) -> int | None:
    """Pending photos from which training a network pays; None: never (worse than `loss_limit`, or no faster)."""
    if m.loss_ratio > loss_limit or m.network_s >= m.optimize_s:
        return None
    return int(-(-m.train_s // (m.optimize_s - m.network_s)))  # rounded up


MEASURED = Measured(218.0, 39.3, 13.5, 1.11)
# CUDA: the CPU's figures, on the assumption (not measured) that a training step and an optimisation step
# speed up alike there; the loss ratio does not depend on the device. Other device types (mps) count as the CPU.
BREAK_EVEN: dict[str, int | None] = {"cpu": break_even(MEASURED), "cuda": break_even(MEASURED)}
CHECKPOINT_S = 300.0  # seconds of training between checkpoints
TRAINING = "(training)"  # the content column of a training curve's rows in losses.csv


@dataclass(frozen=True)
class StyleMethod:
    """How a style's pending pairs are made, decided once per run (`assign`)."""

    style: str
    method: str  # optimize or network
    model_recipe: str
    photos: tuple[tuple[str, Path], ...]  # (name, path): what a new network trains on, an even sample of
    # the style's pending photos (a network trained already keeps the photos its checkpoint names)
    model_file: str  # relative to OUT, whichever shard's ledger: models/<style>.pt
    pending: int  # pairs done under neither method's recipe when the run started


# Settings in a pair's recipe that training never reads: the refinement's (each pair's own recipe covers
# them) and the output file's. Changing one redoes pairs, never retrains. Any other key (a new one too) is
# taken to change what a network learns.
_NOT_TRAINING = frozenset({"optimizer", "lr", "steps", "init", "scales", "stop_window", "stop_tolerance",
                           "format", "quality", "bit_depth", "keep_gps", "batch"})


def model_recipe(settings: Settings, pair: Pair) -> str:
    """The recipe of `pair`'s style's network: the style's file (or blend) hash, its settings with its
    per_style overrides applied (the part of the plain recipe a network learns from, without the photo),
    network_steps, the training constants and the architecture version. No photo is in it: a collection
    that grows keeps its networks and the pairs they made."""
    look = {k: v for k, v in recipe_settings(style_settings(settings, pair.overrides)).items()
            if k not in _NOT_TRAINING}
    head = json.dumps({"arch": network.ARCH_VERSION, "network_steps": settings.network_steps, "look": look,
                       "style": pair.style_hash,
                       "train": [network.TRAIN_BATCH, network.CROP_MAX, network.LR, network.WARMUP]},
                      sort_keys=True, default=str)
    return hashlib.sha256(head.encode()).hexdigest()[:16]


def network_recipe(pair_recipe: str, model: str, refine_steps: int) -> str:
    return hashlib.sha256(f"network\0{pair_recipe}\0{model}\0{refine_steps}".encode()).hexdigest()[:16]


def even_sample(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def choose(method: str, pending: int, device_type: str) -> str:
    if method != "auto":
        return method
    n = BREAK_EVEN.get(device_type, BREAK_EVEN["cpu"])
    return "network" if n is not None and pending >= n else "optimize"


def assign(plan: Plan, settings: Settings, done: dict[tuple[str, str], str], device_type: str,
           networks: bool = True) -> tuple[Plan, dict[str, StyleMethod], dict[tuple[str, str], str]]:
    """The plan with each pair's recipe for the method that makes it, each style's choice, and each pair's
    method ((content, style) -> optimize or network). `done`:
    the ledger's done pairs and their recipes. `method: optimize` keeps the plain recipes; `network`
    gives every pair of the style the network recipe; `auto` keeps a done pair as it was made (either
    way) and gives the pending ones the method its count of pending photos chooses. networks=False: a
    driver that trains none (the Ray driver): `auto` optimises every pending pair, still keeping a done
    pair a network made."""
    by_style: dict[str, list] = {}
    for p in plan:
        by_style.setdefault(p.style, []).append(p)
    styles: dict[str, StyleMethod] = {}
    recipes: dict[tuple[str, str], str] = {}
    methods: dict[tuple[str, str], str] = {}
    for style, pairs in by_style.items():
        model = model_recipe(settings, pairs[0])
        # `method: optimize` never makes or keeps a network pair: no network recipes to compute (a sha256
        # a pair: 200,000 of them on every start of a collection run).
        net = ({} if settings.method == "optimize" else
               {(p.content, style): network_recipe(p.recipe, model, settings.refine_steps) for p in pairs})
        todo = [p for p in pairs if done.get((p.content, style)) not in (p.recipe, net.get((p.content, style)))]
        pending = len(todo)
        method = choose(settings.method, pending, device_type) if networks else "optimize"
        # What a network trained now learns from: the photos still to make (all of them if none is).
        sample = even_sample(sorted(todo or pairs, key=lambda p: p.content), network.TRAIN_PHOTOS)
        colors = style_settings(settings, pairs[0].overrides).colors
        if colors != "style" and method == "network":
            # A network learns one set of style targets for every photo; `preserve` and `match` make
            # targets per photo. auto optimises such a style; asked for explicitly, it is refused.
            if settings.method == "network":
                raise ConfigError(f"{style}: method network works with colors: style only, this style has "
                                  f"colors: {colors} (keys 'method', 'colors')")
            method = "optimize"
        for p in pairs:
            key = (p.content, style)
            if settings.method == "auto" and done.get(key) in (p.recipe, net[key]):
                recipes[key] = done[key]  # made already, one way or the other: kept
            else:
                recipes[key] = net[key] if method == "network" else p.recipe
            methods[key] = "network" if recipes[key] == net.get(key) else "optimize"
        styles[style] = StyleMethod(style, method, model, tuple((p.content, p.content_path) for p in sample),
                                    f"{MODELS}/{style}.pt", pending)
    # A new Pair only where the recipe changes: rebuilding all 200,000 frozen dataclasses took 3.5 s a start.
    made = [p if (r := recipes[(p.content, p.style)]) == p.recipe else dataclasses.replace(p, recipe=r) for p in plan]
    return Plan(made, plan.skipped), styles, methods


def choice_line(sm: StyleMethod, settings: Settings, device_type: str) -> str:
    if settings.method != "auto":
        return f"{sm.style}: method {sm.method} (key 'method')"
    n = BREAK_EVEN.get(device_type, BREAK_EVEN["cpu"])
    rule = (f"auto trains a network from {n} on {device_type}" if n is not None else
            f"auto trains none on {device_type}: none was measured within {LOSS_LIMIT:.2f}x of optimize's loss")
    return f"{sm.style}: method {sm.method} ({sm.pending} photo(s) pending; {rule})"


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


class Trainer:
    """Trains (or loads) a style's network when its first network pair comes up, with checkpoints."""

    def __init__(self, folder: Path, ledger: Ledger, engine: Engine, styles: dict[str, StyleMethod],
                 methods: dict[tuple[str, str], str], loss_log: LossLog, note: Callable[[str], None],
                 checkpoint_s: float | None = None):
        self.folder, self.ledger, self.engine, self.styles = folder, ledger, engine, styles
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
        except PairError as e:
            self.failed[job.style] = e
            raise
        except (FloatingPointError, ValueError, RuntimeError) as e:
            self.failed[job.style] = PairError("training", f"training the network of {job.style} failed: {e}")
            raise self.failed[job.style] from None

    def _ensure(self, job: Job, wait: bool) -> None:
        sm = self.styles[job.style]
        s = self.engine.settings
        path = s.out / sm.model_file  # OUT's: one model a style, whichever shard or worker makes its pairs
        ck = self._load(path, sm.model_recipe)
        waiting = False
        while ck is None or ck["state"]["step"] < s.network_steps:
            # One trainer a style, among every worker and shard on OUT; the others wait for its model.
            claim = TrainingClaim(path, s.lease_s)
            if claim.take():
                try:  # read again: the one before us may have checkpointed, or finished, since
                    ck = self._load(path, sm.model_recipe)
                    if ck is None or ck["state"]["step"] < s.network_steps:
                        ck = self._train(job, sm, path, ck)
                finally:
                    claim.release()
                break
            if not wait:
                raise TrainingElsewhere(f"{job.style}: its network is being trained by {claim.holder()}")
            if not waiting:
                self.note(f"{job.style}: its network is being trained by {claim.holder()}; waiting for it")
                waiting = True
            time.sleep(min(2.0, s.lease_s / 4))
            ck = self._load(path, sm.model_recipe)
        if self.ledger.models().get(job.style, {}).get("recipe") != sm.model_recipe or \
                self.ledger.models()[job.style]["step"] != ck["state"]["step"]:
            self._record(sm, ck)  # trained by an earlier run or another worker: this ledger learns of it
        self.engine.load_model(job, ck["state"])

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
        s = self.engine.settings
        # A network trained on from its checkpoint keeps the photos it started with: the same model, however
        # the collection has changed since. A photo gone since is left out.
        chosen = [(n, Path(p)) for n, p in ck["photos"]] if ck and ck["photos"] else list(sm.photos)
        photos, names = [], []
        for name, p in chosen:
            try:
                photos.append(load_photo(p, s.size, s.max_megapixels)[0])  # at the working size, on the CPU
                names.append((name, str(p)))
            except PairError:
                continue  # an unreadable photo fails its own pairs; the network trains on the others
        if not photos:
            raise PairError("training", f"no photo of {job.style} could be decoded to train its network on")
        state = None if ck is None else ck["state"]
        start = 0 if state is None else int(state["step"])
        kept = [p for p in (ck["curve"] if ck else []) if p[0] <= start]
        rows: list[LogRow] = []
        t0 = time.perf_counter()
        named = _Named(TRAINING, job.style)
        px = min(network.CROP_MAX, s.size)
        self.note(f"{job.style}: training its network on {len(photos)} photo(s), step {start} of {s.network_steps}"
                  f"{' (resumed from its checkpoint)' if start else ''}")

        window = WindowMean(s.log_every, s.network_steps)

        def on_loss(step: int, terms) -> None:
            mean = window.add(step, *(float(t.mean()) for t in (terms.content, terms.style, terms.tv)))
            if mean is not None:
                row = LogRow(step, px, *mean, sum(mean), time.perf_counter() - t0)
                rows.append(row)
                self.loss_log.write(named, 0, [row])

        while True:
            since = time.monotonic()
            state = self.engine.train(job, photos, state, s.network_steps, on_loss,
                                      lambda step: time.monotonic() - since >= self.checkpoint_s)
            ck = self._save(path, sm, state, kept, rows, names)
            if state["step"] >= s.network_steps:
                break
            self.note(f"{job.style}: network checkpoint at step {state['step']} of {s.network_steps}")
        self.note(f"{job.style}: network trained ({s.network_steps} steps, {time.perf_counter() - t0:.0f} s)")
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
        self.ledger.set_model(sm.style, sm.model_recipe, int(ck["state"]["step"]), self.engine.settings.network_steps,
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
