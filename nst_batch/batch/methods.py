"""Which method makes each pair of a run (`method: optimize`, `network`, or `auto` per style), and the
recipes that follow: a style's network's (model_recipe) and a pair made by one (network_recipe). Decided
once per run, before the first claim, by whatever computes the pairs (run/session.py); the training
itself is run/training.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.manifest import Settings
from ..core import network
from ..errors import ConfigError
from ..files.layout import MODELS
from .plan import Pair, Plan, recipe_settings, style_settings

# `auto` trains a style's network only where that path is both faster and nearly as good: its measured
# loss (forward pass + the default refinement, scored like optimize's by the gatys objective at full size)
# at most LOSS_LIMIT times optimize's, and at least the break-even of pending photos, train / (optimize a
# photo - network a photo): both methods are linear in the photos, training is paid once a style.
# Measured on this CPU at 128 px (docs/benchmarks.md, "Real photos, 2026-12-06" and "How many refine
# steps"): 24 real photos x 2 paintings, 1 thread, the methods interleaved photo by photo: optimize 39.3 s
# a photo, the network + 50 refine steps 13.5 s at 1.09x (The Starry Night) and 1.11x (The Great Wave)
# optimize's loss; 70 refine steps (the default) take 1.39x the time of 50 (18.8 s) at 1.05x and 1.06x.
# The worse style counts (a user's may be either). Training 600 steps: 218 s alone on the machine (553-690 s
# beside other runs). Break-even: 218 / (39.3 - 18.8) = 10.6, so 11 photos.
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


MEASURED = Measured(218.0, 39.3, 18.8, 1.06)
# CUDA: the CPU's figures, on the assumption (not measured) that a training step and an optimisation step
# speed up alike there; the loss ratio does not depend on the device. Other device types (mps) count as the CPU.
BREAK_EVEN: dict[str, int | None] = {"cpu": break_even(MEASURED), "cuda": break_even(MEASURED)}


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


def assign(plan: Plan, settings: Settings, done: dict[tuple[str, str], str],
           device_type: str) -> tuple[Plan, dict[str, StyleMethod], dict[tuple[str, str], str]]:
    """The plan with each pair's recipe for the method that makes it, each style's choice, and each pair's
    method ((content, style) -> optimize or network). `done`:
    the ledger's done pairs and their recipes. `method: optimize` keeps the plain recipes; `network`
    gives every pair of the style the network recipe; `auto` keeps a done pair as it was made (either
    way) and gives the pending ones the method its count of pending photos chooses (on `device_type`,
    the local engine's or the Ray actors')."""
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
        method = choose(settings.method, pending, device_type)
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
