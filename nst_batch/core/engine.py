"""The engine: what is loaded once per process, and the pure work of turning jobs into images.

Tensors and settings in, images (tensors) and loss rows out. An `Engine` holds VGG19 on the device and
the style-target cache (targets.StyleTargets), and `make(jobs)` returns one `Made` per job: the image, its
loss rows, its final and starting losses, or the `PairError` that failed it. It reads and writes no file,
decodes nothing, hashes nothing, touches no ledger and handles no signal: the I/O stage (files.stage)
decodes each photo to a tensor at its working size before and encodes the image after, and gives the
engine the style images by their cache key (a `StylePixels` provider), so a driver can overlap that I/O
with the compute, on this process or another.

A Job may carry its style's per_style overrides and, for a blend, its members' keys and weights: `setup`
gives the settings, objective and optimiser of each distinct overrides (made once), and the style cache
holds targets by style key (a blend's covers its members and weights) and long side (which `style_size`
sets), so every job is made with its own style's settings.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import colors, losses, memory, network
from ..config.manifest import PER_STYLE_KEYS, Overrides, Settings
from ..config.objective import MIN_SIDE, Objective, objective_from
from ..errors import PairError
from .device import DeviceConfig, optim_config, pick_device, resolve  # noqa: F401  (the engine's API)
from .models import Models
from .optimize import EagerChunks, GraphChunks, LogRow, OptimConfig, Result, progress_error
from .pyramid import stylize
from .vgg import resize
from .targets import STYLE_CACHE, StylePixels, StyleTargets  # noqa: F401


@dataclass(frozen=True)
class Job:
    """One pair to make. `content`/`style` name it (loss rows, notes); `photo` is the photo (1, 3, H, W) in
    [0, 1] on the CPU, already at its working size (decoded and resized by the I/O stage); `style_key`
    keys the style cache (the style file's hash; a blend's hash for a blend); `members`: a blend's
    (key, weight) pairs, () for a style file (`style_key` alone); `overrides`: the style's per_style
    settings, applied on the engine's own (only manifest.PER_STYLE_KEYS)."""

    content: str
    style: str
    photo: torch.Tensor = field(compare=False, repr=False)
    style_key: str
    members: tuple[tuple[str, float], ...] = ()
    overrides: Overrides = ()
    method: str = "optimize"  # or "network": the style's model (Engine.load_model) then refine_steps of L-BFGS
    # method network: the recipe of the model to use (methods.model_recipe). Models are kept by it, not by
    # the style's file: two styles of one image (per_style sets them apart) or one style in two shards'
    # ledgers (each trains its own) have models of their own. None: keyed by the style key (a benchmark).
    model: str | None = None

    def weighted(self) -> tuple[tuple[str, float], ...]:
        """The style as (key, weight) pairs: a blend's members, or the style file alone."""
        return self.members or ((self.style_key, 1.0),)


@dataclass(frozen=True)
class Setup:
    """What a group of jobs is made with: the engine's settings with their style's overrides applied,
    the objective of their weights, and the optimiser with their steps."""

    settings: Settings
    objective: Objective
    optim: OptimConfig


@dataclass
class Made:
    """What became of one Job. `error` set means the pair failed; `image` is there whenever an optimisation
    ran (also for a `no_progress` failure, whose losses a benchmark may want to read)."""

    job: Job
    image: torch.Tensor | None = None  # (1, 3, H, W) in [0, 1] on the CPU
    logs: list[LogRow] = field(default_factory=list)  # every row logged, of every try, the final row last
    final: LogRow | None = None  # the losses of the image as made
    start: LogRow | None = None  # the losses of doing nothing (the no_progress check compares with it)
    steps: int = 0
    # A remark the ledger and report keep beside a done pair (an unusable ICC profile): the driver's, from
    # what decoding said (the engine never sees a file).
    note: str | None = None
    error: PairError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


OnLog = Callable[[Job, LogRow], None]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _no_styles(key: str, long_side: int) -> torch.Tensor:
    raise PairError("internal", f"no style images were given to the engine (style {key})")


def bucket_shape(h: int, w: int, bucket: int) -> tuple[int, int]:
    """The working shape of a photo of (h, w) with `bucket: N`: each side rounded to the nearest multiple of
    N (halves up, at least N); N = 0 keeps it. Photos of one style and one such shape share a batch."""
    n = bucket
    return (h, w) if not n else (max(n, (h + n // 2) // n * n), max(n, (w + n // 2) // n * n))


class Engine:
    """VGG19 on the device, loaded once, and each style's Gram targets, computed once per size.

    `config` defaults to resolve(settings, device type); a test passes resolve(settings, "cuda") to run
    the GPU configuration on the CPU, a benchmark its own OptimConfig in a DeviceConfig. `style_pixels`
    gives a style's image by its key (files.stage.StyleImages, built from the plan's paths).
    """

    def __init__(self, settings: Settings, device: torch.device | None = None, config: DeviceConfig | None = None,
                 free_memory: memory.FreeMemory | None = None, style_pixels: StylePixels | None = None):
        from .vgg import load_vgg19

        # Bytes a pair may still use on the device (memory.free_bytes; a test passes its own; None: unknown)
        self.free_memory = free_memory or memory.free_bytes

        self.device = device or pick_device(settings.device)
        if config is None:
            cuda = self.device.type == "cuda"
            config = resolve(settings, self.device.type, cuda and torch.cuda.is_bf16_supported())  # GPU-only query
        self.config = config
        self.settings = config.settings  # precision resolved: what the plan and the recipe use
        self.optim = config.optim
        s = self.settings
        self.objective = objective_from(s.layers, s.content_weight, s.style_weight, s.tv_weight)
        if config.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # GPU-only line
        self.net = load_vgg19(s.weights, self.objective.last_layer, self.device, s.pooling)
        if self.optim.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if s.compile:
            self.net.forward = torch.compile(self.net.forward, dynamic=False)
        self._on_note: Callable[[str], None] = lambda _: None  # the note of the make() in progress
        # How L-BFGS's chunks run: CUDA graphs where the config says so (they fall back to eager by themselves).
        self.chunks = (GraphChunks(lambda msg: self._on_note(msg)) if config.cuda_graphs
                       else EagerChunks())
        self.style_pixels = style_pixels or _no_styles  # the driver's, which also knows what decoding noted
        self.styles = StyleTargets(self.style_pixels, self._targets_of, self.device)
        self.models = Models(self.device)
        self.style_passes = 0  # forward passes spent on style targets: the cache test counts them
        self._auto_batch: dict[tuple, int] = {}  # batch: auto, per (height, width, optimizer, steps)
        self._setups: dict[Overrides, Setup] = {(): Setup(s, self.objective, self.optim)}
        self._objectives: dict[Objective, Objective] = {self.objective: self.objective}  # one per distinct weights

    def setup(self, overrides: Overrides) -> Setup:
        """The settings, objective and optimiser of a style with these per_style overrides (made once each).
        Only per-style keys differ from the engine's own, so the network and device config still fit."""
        if overrides not in self._setups:
            bad = [k for k, _ in overrides if k not in PER_STYLE_KEYS]
            if bad:
                raise ValueError(f"not a per-style key: {', '.join(bad)}")
            s = self.settings.replace(**dict(overrides))
            obj = objective_from(s.layers, s.content_weight, s.style_weight, s.tv_weight)
            obj = self._objectives.setdefault(obj, obj)
            # The engine's OptimConfig (a benchmark may have passed its own) with this style's steps.
            self._setups[overrides] = Setup(s, obj, dataclasses.replace(self.optim, steps=s.steps))
        return self._setups[overrides]

    # -- style targets

    def _targets_of(self, t: torch.Tensor) -> losses.Targets:
        """Gram targets of style image(s) (N, 3, h, w) on the device: one forward pass, no gradient."""
        if self.optim.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(self.device.type, dtype=self.optim.autocast_dtype)
               if self.optim.autocast_dtype else nullcontext())
        with torch.no_grad(), amp:
            feats = self.net(t, frozenset(self.objective.style_layers))
            targets = losses.style_targets(self.objective, feats)
        self.style_passes += 1
        return targets

    def style_targets(self, key: str, long_side: int) -> losses.Targets:
        """A style's targets at this working long side (computed once, then kept)."""
        return self.styles.style(key, long_side)

    def job_targets(self, job: Job, long_side: int) -> losses.Targets:
        """`job`'s style targets (a blend's: of its members) for `colors: style`."""
        if job.members:
            return self.styles.blend(job.members, job.style_key, long_side)
        return self.styles.style(job.style_key, long_side)

    # -- making

    def make(self, jobs: list[Job], on_log: OnLog | None = None,
             on_note: Callable[[str], None] | None = None) -> list[Made]:
        """One Made per job, in order. Jobs of one style whose photos share a working shape are optimised
        together in batches of up to `batch`; a failure (no progress, out of memory twice, a non-finite
        loss, a style that cannot be decoded) fails its own job or batch only. `on_log(job, row)` hears
        every loss row as it is made (the rows are in Made.logs too); `on_note` hears what the
        out-of-memory policy did."""
        made: list[Made | None] = [None] * len(jobs)
        self._on_note = on_note or (lambda _: None)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            # One batch shares a style (its targets) and its settings (objective, steps, style size).
            key = (job.style_key, job.members, job.overrides, self.shape_of(job), job.method, job.model)
            groups.setdefault(key, []).append(i)
        for group in groups.values():
            batch = self.batch_size(jobs[group[0]])
            for k in range(0, len(group), batch):
                part = group[k:k + batch]
                try:
                    results = self._make_with_oom_retry([jobs[i] for i in part], on_log, on_note or (lambda _: None))
                except Exception as e:  # this batch fails; the others go on
                    err = e if isinstance(e, PairError) else PairError("internal", f"{type(e).__name__}: {e}")
                    results = [Made(jobs[i], error=err) for i in part]
                for i, m in zip(part, results):
                    made[i] = m
        assert all(m is not None for m in made)
        return made  # type: ignore[return-value]

    def shape_of(self, job: Job) -> tuple[int, int]:
        """The (H, W) `job` is optimised at: its photo's, or with `bucket: N` each side rounded to the nearest
        multiple of N (at least N), so photos of nearly one shape share a batch; the image is resized back
        to its photo's shape at the end (its loss rows are those of the bucket's shape)."""
        h, w = (int(v) for v in job.photo.shape[-2:])
        return bucket_shape(h, w, self.settings.bucket)

    def batch_size(self, job: Job) -> int:
        """How many jobs like `job` (its style, working shape and steps) one batch holds: `batch`, or for auto
        as many as the memory model fits in the device's free memory (memory.auto_batch, at most
        DeviceConfig.auto_batch_max), decided the first time a shape is seen and kept."""
        if self.settings.batch != "auto":
            return int(self.settings.batch)
        cfg = self.optim_for(job)
        key = (*self.shape_of(job), cfg.optimizer, cfg.steps)
        if key not in self._auto_batch:
            most = self.config.auto_batch_max
            free = self.free_memory(self.device) if most > 1 else None
            self._auto_batch[key] = memory.auto_batch(key[0], key[1], cfg.optimizer, cfg.steps, free, most)
        return self._auto_batch[key]

    def _batch(self, jobs: list[Job], on_log: OnLog | None) -> list[Made]:
        """Stylize jobs that share a style and a working shape in one batch tensor."""
        shape = self.shape_of(jobs[0])
        content = torch.cat([resize(j.photo, *shape).clamp(0, 1) for j in jobs]).to(self.device)
        job = jobs[0]
        setup = self.setup(job.overrides)
        full_long = max(content.shape[-2:])
        style_full = setup.settings.style_px(full_long)  # a fraction follows the size actually made
        logs: list[list[LogRow]] = [[] for _ in jobs]

        mode = setup.settings.colors  # per_style can set it

        def style_for(h: int, w: int) -> losses.Targets:
            long_side = max(MIN_SIDE, round(style_full * max(h, w) / full_long))
            if mode == "style":
                return self.job_targets(job, long_side)
            # preserve / match: the style (each member of a blend) made to suit the photo, then blended.
            return self.styles.for_photo(job.weighted(), long_side, content, mode)

        def logged(rows: list[LogRow]) -> None:
            for job, log, row in zip(jobs, logs, rows):
                log.append(row)
                if on_log:
                    on_log(job, row)

        if job.method == "network":  # one forward pass, then refine_steps at full size from it
            res = stylize(self.net, setup.objective, content, style_for, self.optim_for(job), logged,
                          init=network.apply(self.models.get(self._model_key(job)), content), runner=self.chunks)
        else:
            # For `preserve` the optimiser works on the photo's luminance (grey RGB), and its losses (the loss
            # rows, the no_progress check) are those of that luminance objective; the photo's chroma is put
            # back at the end, at full size. pyramid.stylize itself never knows about colours.
            res = stylize(self.net, setup.objective, colors.for_content(content, mode), style_for, setup.optim, logged,
                          runner=self.chunks)
            res.images = colors.finish(res.images, content.float().cpu(), mode)
        made = []
        for i, job in enumerate(jobs):
            if not logs[i] or logs[i][-1].step != res.final[i].step:  # the final row, unless already logged
                logged_final = res.final[i]
                logs[i].append(logged_final)
                if on_log:
                    on_log(job, logged_final)
            steps = res.each[i] if res.each else res.steps  # its own: it stopped on its own
            image = res.images[i:i + 1]
            if image.shape[-2:] != job.photo.shape[-2:]:  # made at its bucket's shape (shape_of)
                image = resize(image, *job.photo.shape[-2:]).clamp(0, 1)
            one = Result(image, [res.final[i]], steps, [res.start[i]])
            made.append(Made(job, one.images, logs[i], res.final[i], res.start[i], steps,
                             error=progress_error(one, setup.optim)))
        return made

    # -- learned per-style networks: states in and out, the driver keeps the files

    def refine_config(self, setup: Setup) -> OptimConfig:
        """A network's output refined by refine_steps at full size only. Measured on real photos at 128 px,
        a half-size start (20-60 steps there, then 10-20 at full size) was slower for its loss than full-size
        steps alone, and fewer full-size steps (30) were 1.2-1.3x optimize's loss (docs/benchmarks.md)."""
        return dataclasses.replace(setup.optim, steps=self.settings.refine_steps, scales=(1.0,))

    def optim_for(self, job: Job) -> OptimConfig:
        """The optimiser `job` runs: its style's (per_style may set `steps`), or for a network's output
        refine_steps at full size. What the memory check and the progress line count, as `_batch` runs."""
        setup = self.setup(job.overrides)
        return self.refine_config(setup) if job.method == "network" else setup.optim

    def train(self, job: Job, photos: list[torch.Tensor], state: dict | None, until: int,
              on_loss: Callable[[int, losses.LossTerms], None] | None = None,
              should_pause: Callable[[int], bool] | None = None) -> dict:
        """Train the network of `job`'s style up to step `until` on `photos` (the collection's, each
        (1, 3, H, W) at `size` on the CPU; each step's crops move to the device), from `state`
        (network.state_dict; None: afresh, seeded by `seed`), and return the new state.
        `should_pause(step)` lets the driver stop early to save a checkpoint; it calls again to go on."""
        setup = self.setup(job.overrides)  # the style's own weights and style size (per_style)
        s = setup.settings
        if s.colors != "style":  # the plan refuses it (methods.assign): a network learns one set of targets
            raise ValueError(f"method network with colors {s.colors!r}")
        targets = self.job_targets(job, s.style_px(s.size))
        st = network.new_state(s.seed, self.device) if state is None else network.from_state_dict(state, self.device)
        network.train_steps(st, self.net, setup.objective, photos, targets, until, self.optim.autocast_dtype,
                            on_loss, (lambda t: should_pause(t.step)) if should_pause else None)
        return network.state_dict(st)

    def _model_key(self, job: Job) -> str:
        return job.model if job.model is not None else job.style_key

    def load_model(self, job: Job, state: dict) -> None:
        """Use this trained state for `job`'s model (Job.model; Job.method network)."""
        self.models.load(self._model_key(job), state)

    def has_model(self, job: Job) -> bool:
        return self._model_key(job) in self.models

    def model(self, key: str) -> network.TransformerNet:
        """A loaded network by its key: the model's recipe (Job.model), else the style key."""
        return self.models.get(key)

    # -- the memory policy

    def _make_with_oom_retry(self, jobs: list[Job], on_log: OnLog | None, on_note: Callable[[str], None]) -> list[Made]:
        """Before starting, the batch's predicted peak (memory.need) is compared with the free memory: a batch
        that would not fit is split into single jobs, and a single job that would not fit fails as `oom`
        naming the largest size that would (on Linux a CPU run past its memory is killed, not told). A real
        out-of-memory error does the same: a batch is split, a single job fails. Never made smaller instead:
        an image marked done must be the size its recipe says."""
        size = self.settings.size
        h, w = self.shape_of(jobs[0])
        free = self.free_memory(self.device)
        cfg = self.optim_for(jobs[0])  # the batch's own steps (one style, one method): L-BFGS's history grows with them
        predicted = memory.need(h, w, len(jobs), cfg.optimizer, cfg.steps)
        if free is None or predicted.bytes <= free:
            try:
                return self._batch(jobs, on_log)
            except Exception as e:
                if not is_oom(e):
                    raise
            self._free_memory()
            free = self.free_memory(self.device)
            why = f"ran out of memory at {size} px" + (f" ({memory.gb(free)} free now)" if free is not None else "")
            # The model thought it fits: suggest at most half the pixels, less if the free memory says so.
            below = int(size / math.sqrt(2)) + 1
        else:
            why = f"needs ~{memory.gb(predicted.bytes)} at {size} px ({w}x{h}), {memory.gb(free)} free"
            below = size
        if len(jobs) > 1:
            on_note(f"a batch of {len(jobs)} {'ran out of memory' if below < size else 'would not fit in memory'}; "
                    "making them one at a time")
            return [m for job in jobs for m in self._make_with_oom_retry([job], on_log, on_note)]
        # The photo's shape at its working size: its aspect is what the sizes that would fit follow.
        fits = None if free is None else memory.largest_fitting(w, h, free, 1, cfg.optimizer, cfg.steps, below)
        advice = f"{fits} px would fit" if fits else "no smaller size would fit"
        raise PairError("oom", f"{why}; {advice}; lower 'size'")

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
