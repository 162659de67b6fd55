"""The engine: what is loaded once per process, and the pure work of turning pairs into images.

`resolve` decides, once, everything that depends on the device (precision, memory layout, cuDNN);
the plan's recipe and the optimiser both read its answer. An `Engine` holds VGG19 on the device and
a bounded cache of style targets, and `make(jobs)` returns one `Made` per job: the image, its loss
rows, its final and starting losses, a note for the log, or the
`PairError` that failed it. It writes no file, touches no ledger and handles no signal, so a
driver on another process or machine can run it and send the results back (`encode` turns a result
into the bytes of its file, with the sRGB profile and the photo's metadata, and of its thumbnail);
`runner` is the local driver.

A Job may carry its style's per_style overrides and, for a blend, its member images: `setup` gives the
settings, objective and optimiser of each distinct overrides (made once), and the style cache holds
targets by style hash (a blend's covers its members and weights) and long side (which `style_size`
sets), so every job is made with its own style's settings.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import colors, losses, memory, network
from ..files import images
from ..errors import ConfigError, PairError
from ..config.objective import MIN_SIDE
from ..config.manifest import PER_STYLE_KEYS, Settings
from ..config.objective import Objective, objective_from
from .optimize import LogRow, OptimConfig, Result, progress_error
from ..config.manifest import Member, Overrides
from ..files.hashing import file_hash
from .pyramid import auto_scales, stylize

# Styles whose Gram targets the engine keeps, least recently used dropped first. Plans run photo by
# photo (each photo decoded once for all its styles), so every style of a run comes back once per photo:
# keep them all, up to this bound. Measured for one style, gatys: targets 2.33 MiB a scale whatever the
# image size (4.66 MiB at scales [0.5, 1.0]), so 64 styles hold at most ~300 MB.
STYLE_CACHE = 64
# Decoded style images kept, for targets at a size not seen yet (a photo of another shape): 4 bytes a
# pixel (2.9 MiB for 1071×712, 400 MB at max_megapixels 100), so only a few.
STYLE_IMAGES = 2


# -- device and precision, resolved once ------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' asked for, but PyTorch sees no CUDA GPU (key 'device')")
        idx = int(name.partition(":")[2] or 0)
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' asked for, but there are {torch.cuda.device_count()} GPUs (key 'device')")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but this PyTorch has no MPS support here (key 'device')")
    return torch.device(name)


def optim_config(settings: Settings, channels_last: bool) -> OptimConfig:
    """The optimiser's settings, all read from resolved Settings (precision fp32 or bf16): the only place
    an OptimConfig is made from Settings, so the two can never disagree on a default."""
    if settings.precision not in ("fp32", "bf16") or isinstance(settings.scales, str):
        raise ValueError(f"precision {settings.precision!r} or scales {settings.scales!r} not resolved yet: use resolve()")
    return OptimConfig(
        steps=settings.steps, optimizer=settings.optimizer, lr=settings.lr, scales=settings.scales,
        init=settings.init, seed=settings.seed, log_every=settings.log_every, stop_window=settings.stop_window,
        stop_tolerance=settings.stop_tolerance,
        autocast_dtype=torch.bfloat16 if settings.precision == "bf16" else None, channels_last=channels_last)


@dataclass(frozen=True)
class DeviceConfig:
    """Everything decided from the device, made in one place (`resolve`), so a test can build what a
    CUDA run would use and run it on the CPU: only the device then differs."""

    settings: Settings  # precision resolved to fp32 or bf16, scales to a list: what the plan's recipe records
    optim: OptimConfig  # including bf16 autocast and channels_last
    cudnn_benchmark: bool  # applied on a CUDA device only (Engine.__init__)


def resolve(settings: Settings, device_type: str, bf16_supported: bool = True) -> DeviceConfig:
    """The settings for a device type ('cuda', 'cpu', 'mps'). `bf16_supported` is the CUDA card's answer
    (torch.cuda.is_bf16_supported()); `precision: auto` means bf16 on CUDA when it says yes. `scales: auto`
    becomes the levels for `size` (pyramid.auto_scales), so the recipe records the levels actually run."""
    cuda = device_type == "cuda"
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda and bf16_supported)
    scales = auto_scales(settings.size) if settings.scales == "auto" else settings.scales
    resolved = settings.replace(precision="bf16" if bf16 else "fp32", scales=scales)
    # The same few shapes repeat for hundreds of steps: let cuDNN pick the fastest kernels once.
    return DeviceConfig(resolved, optim_config(resolved, channels_last=cuda), cudnn_benchmark=cuda)


# -- tensors and encoded images --------------------------------------------------------------------

def to_tensor(im: Image.Image, long_side: int) -> torch.Tensor:
    """RGB image -> float tensor (1, 3, H, W) in [0, 1] with the long side resized to `long_side`."""
    w, h = images.fit_long_side(*im.size, long_side)
    if min(w, h) < MIN_SIDE:
        raise PairError("too_small", f"{w}x{h} at {long_side} px: the short side would be under {MIN_SIDE} px; "
                        "raise 'size'")
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_pil(t: torch.Tensor) -> Image.Image:
    a = t.detach().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def to_uint16(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint16, straight from the optimiser's floats (never through 8 bits)."""
    a = t.detach().squeeze(0).double().clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0)
    return a.cpu().numpy().astype(np.uint16)


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the output file: PNG (8 or 16 bits) or JPEG, with the sRGB profile and the photo's EXIF
    thumb: bytes  # its thumbnail for the report (JPEG, images.thumbnail_jpeg)


def encode(made: "Made", settings: Settings) -> Encoded:
    """A made image as the bytes of its output file and of its thumbnail: what both drivers write (the Ray
    actor sends these across). The image is converted to 8 bits once, for the thumbnail and an 8-bit file;
    a 16-bit PNG is made from the floats themselves."""
    assert made.image is not None
    im = to_pil(made.image)
    exif = images.output_exif(made.meta, im.size, settings.keep_gps)
    if settings.bit_depth == 16:
        data = images.png16(to_uint16(made.image), exif)
    else:
        buf = io.BytesIO()
        images.encode_to(im, buf, settings.format, settings.quality, exif)
        data = buf.getvalue()
    return Encoded(data, images.thumbnail_jpeg(im))


# -- pairs in, results out -------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One pair to make. `content`/`style` name it (loss rows, notes); `style_hash` keys the style cache
    by content (the plan's hash; None: hashed here, once per path); `image` is the photo already decoded
    (a driver that decodes on a thread of its own; images.load_rgb's, carrying its PhotoMeta), else the engine
    decodes it. `members`: a blend's images and weights (empty: the style is `style_path` alone); `overrides`:
    the style's per_style settings, applied on the engine's own (only manifest.PER_STYLE_KEYS)."""

    content: str
    style: str
    content_path: Path
    style_path: Path
    style_hash: str | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    members: tuple[Member, ...] = ()
    overrides: Overrides = ()
    method: str = "optimize"  # or "network": the style's model (Engine.load_model) then refine_steps of L-BFGS
    # method network: the recipe of the model to use (training.model_recipe). Models are kept by it, not by
    # the style's file: two styles of one image (per_style sets them apart) or one style in two shards'
    # ledgers (each trains its own) have models of their own. None: keyed by the style hash (a benchmark).
    model: str | None = None


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
    note: str | None = None  # a remark the ledger and report keep beside a done pair (an unusable ICC profile)
    error: PairError | None = None
    meta: images.PhotoMeta | None = None  # what the output keeps of its photo (date, camera, GPS)

    @property
    def ok(self) -> bool:
        return self.error is None


OnLog = Callable[[Job, LogRow], None]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class Engine:
    """VGG19 on the device, loaded once, and each style's Gram targets, computed once per size.

    `config` defaults to resolve(settings, device type); a test passes resolve(settings, "cuda") to run
    the GPU configuration on the CPU, a benchmark its own OptimConfig in a DeviceConfig.
    """

    def __init__(self, settings: Settings, device: torch.device | None = None, config: DeviceConfig | None = None,
                 free_memory: memory.FreeMemory | None = None):
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
        # style hash -> decoded image or the PairError it raised (the STYLE_IMAGES most recent), and
        # style hash -> {(long side, ...): targets} (the STYLE_CACHE most recent styles)
        self._style_images: OrderedDict[str, object] = OrderedDict()
        self._style_targets: OrderedDict[str, dict[tuple, losses.Targets]] = OrderedDict()
        self._style_hash: dict[Path, str] = {}
        self._style_meta: dict[str, images.PhotoMeta] = {}  # style hash -> its notes (a broken ICC profile)
        self._models: dict[str, network.TransformerNet] = {}  # style hash -> trained network
        self.style_passes = 0  # forward passes spent on style targets: the cache test counts them
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

    def _style_image(self, path: Path, key: str):
        if key in self._style_images:
            self._style_images.move_to_end(key)
        else:
            while len(self._style_images) >= STYLE_IMAGES:
                self._style_images.popitem(last=False)
            try:
                self._style_images[key] = images.load_rgb(path, self.settings.max_megapixels)
                self._style_meta[key] = images.photo_meta(self._style_images[key])
            except PairError as e:
                self._style_images[key] = PairError(e.kind, f"style {e}")
        im = self._style_images[key]
        if isinstance(im, PairError):
            raise im
        return im

    def _style_side(self, im: Image.Image, long_side: int) -> int:
        # A coarse scale of a small output could shrink a wide style under VGG's minimum: keep its
        # short side at MIN_SIDE at least (Gram matrices do not depend on the image size).
        return max(long_side, math.ceil(MIN_SIDE * max(im.size) / min(im.size)))

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

    def style_targets(self, path: Path, style_hash: str, long_side: int) -> losses.Targets:
        held = self._style_targets.get(style_hash)
        if held is not None:
            self._style_targets.move_to_end(style_hash)
            if long_side in held:
                return held[long_side]
        im = self._style_image(path, style_hash)
        side = self._style_side(im, long_side)
        if held is None:
            while len(self._style_targets) >= STYLE_CACHE:
                self._style_targets.popitem(last=False)
            held = self._style_targets[style_hash] = {}
        if side not in held:
            held[side] = self._targets_of(to_tensor(im, side).to(self.device))
        held[long_side] = held[side]  # asked for by the requested size next time (objective and weights are the engine's own)
        return held[side]

    def blend_targets(self, members: tuple[Member, ...], blend_hash: str, long_side: int) -> losses.Targets:
        """A blend's targets: the weighted sum of its members' Gram targets, each member at the same
        working long side (the style cache keeps the members' and the blend's)."""
        held = self._style_targets.get(blend_hash)
        if held is not None and long_side in held:
            self._style_targets.move_to_end(blend_hash)
            return held[long_side]
        parts = [self.style_targets(m.path, self._file_hash(m.path, m.hash), long_side) for m in members]
        targets = losses.blend(parts, [m.weight for m in members])
        if blend_hash not in self._style_targets:
            while len(self._style_targets) >= STYLE_CACHE:
                self._style_targets.popitem(last=False)
            self._style_targets[blend_hash] = {}
        self._style_targets[blend_hash][long_side] = targets
        return targets

    def photo_style_targets(self, path: Path, style_hash: str, long_side: int, photo: torch.Tensor,
                            mode: str) -> losses.Targets:
        """Targets of the style made to suit each photo of `photo` (B, 3, H, W) for `colors: preserve`
        or `match` (colors.for_style): batch B, one per photo. Not cached: they depend on the photo, and
        a run makes each (photo, style) pair once, so a cache keyed by both would never be hit again;
        they cost one forward pass per scale, next to the hundreds of steps of the pair itself."""
        im = self._style_image(path, style_hash)  # the decoded image is cached, as for `style`
        style = to_tensor(im, self._style_side(im, long_side)).to(self.device)
        return self._targets_of(colors.for_style(style, photo, mode))

    def _file_hash(self, path: Path, given: str | None) -> str:
        if given is not None:
            return given
        path = Path(path)
        if path not in self._style_hash:  # the cache is keyed by content, not name: hash once per process
            self._style_hash[path] = file_hash(path)
        return self._style_hash[path]

    def _hash_of(self, job: Job) -> str:
        return self._file_hash(job.style_path, job.style_hash)

    # -- making

    def make(self, jobs: list[Job], on_log: OnLog | None = None,
             on_note: Callable[[str], None] | None = None) -> list[Made]:
        """One Made per job, in order. Jobs of one style whose photos share a working shape are optimised
        together in batches of up to `batch`; a failure (an undecodable photo, no progress, out of memory
        twice, a non-finite loss) fails its own job or batch only. `on_log(job, row)` hears every loss row
        as it is made (the rows are in Made.logs too); `on_note` hears what the out-of-memory policy did."""
        made: list[Made | None] = [None] * len(jobs)
        groups: dict[tuple, list[tuple[int, Image.Image]]] = {}
        metas: list[images.PhotoMeta | None] = [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                im = job.image if job.image is not None else images.load_rgb(Path(job.content_path),
                                                                             self.settings.max_megapixels)
            except PairError as e:
                made[i] = Made(job, error=e)
                continue
            metas[i] = images.photo_meta(im)
            # One batch shares a style (its targets) and its settings (objective, steps, style size).
            key = (str(job.style_path), job.style_hash, job.members, job.overrides,
                   images.fit_long_side(*im.size, self.settings.size), job.method, job.model)
            groups.setdefault(key, []).append((i, im))
        batch = self.settings.batch
        for group in groups.values():
            for k in range(0, len(group), batch):
                part = group[k:k + batch]
                try:
                    results = self._make_with_oom_retry([jobs[i] for i, _ in part], [im for _, im in part],
                                                        on_log, on_note or (lambda _: None), self.settings.size)
                except Exception as e:  # this batch fails; the others go on
                    err = e if isinstance(e, PairError) else PairError("internal", f"{type(e).__name__}: {e}")
                    results = [Made(jobs[i], error=err) for i, _ in part]
                for (i, _), m in zip(part, results):
                    m.meta, m.note = metas[i], self._noted(m, metas[i])
                    made[i] = m
        assert all(m is not None for m in made)
        return made  # type: ignore[return-value]

    def _noted(self, m: Made, photo: images.PhotoMeta | None) -> str | None:
        """The Made's note, plus what colour management could not do (an unusable ICC profile): the photo
        or style (each member of a blend, whose own hash keys no image) is still used, as sRGB, and the pair
        says so."""
        job = m.job
        styles = ([(f"style {x.path.name}", self._style_meta.get(self._file_hash(x.path, x.hash))) for x in job.members]
                  or [("style", self._style_meta.get(self._hash_of(job)))])
        notes = [m.note] + [f"{what}: {meta.note}" for what, meta in [("photo", photo), *styles]
                            if meta is not None and meta.note]
        return "; ".join(n for n in notes if n) or None

    def _batch(self, jobs: list[Job], ims: list, size: int, on_log: OnLog | None) -> list[Made]:
        """Stylize jobs that share a style and a working shape in one batch tensor."""
        content = torch.cat([to_tensor(im, size) for im in ims]).to(self.device)
        job = jobs[0]
        style_path, style_hash = Path(job.style_path), self._hash_of(job)
        setup = self.setup(job.overrides)
        full_long = max(content.shape[-2:])
        style_full = setup.settings.style_px(full_long)  # a fraction follows the size actually made
        logs: list[list[LogRow]] = [[] for _ in jobs]

        mode = setup.settings.colors  # per_style can set it

        def style_for(h: int, w: int) -> losses.Targets:
            long_side = max(MIN_SIDE, round(style_full * max(h, w) / full_long))
            if mode == "style":
                if job.members:
                    return self.blend_targets(job.members, style_hash, long_side)
                return self.style_targets(style_path, style_hash, long_side)
            # preserve / match: the style (each member of a blend) made to suit the photo, then blended.
            members = job.members or (Member(style_path, 1.0, style_hash),)
            return losses.blend([self.photo_style_targets(m.path, self._file_hash(m.path, m.hash), long_side, content, mode)
                                 for m in members], [m.weight for m in members])

        def logged(rows: list[LogRow]) -> None:
            for job, log, row in zip(jobs, logs, rows):
                log.append(row)
                if on_log:
                    on_log(job, row)

        if job.method == "network":  # one forward pass, then refine_steps at full size from it
            res = stylize(self.net, setup.objective, content, style_for, self.optim_for(job), logged,
                          init=network.apply(self.model(self._model_key(job)), content))
        else:
            # For `preserve` the optimiser works on the photo's luminance (grey RGB), and its losses (the loss
            # rows, the no_progress check) are those of that luminance objective; the photo's chroma is put
            # back at the end, at full size. pyramid.stylize itself never knows about colours.
            res = stylize(self.net, setup.objective, colors.for_content(content, mode), style_for, setup.optim, logged)
            res.images = colors.finish(res.images, content.float().cpu(), mode)
        made = []
        for i, job in enumerate(jobs):
            if not logs[i] or logs[i][-1].step != res.final[i].step:  # the final row, unless already logged
                logged_final = res.final[i]
                logs[i].append(logged_final)
                if on_log:
                    on_log(job, logged_final)
            one = Result(res.images[i:i + 1], [res.final[i]], res.steps, [res.start[i]])
            made.append(Made(job, one.images, logs[i], res.final[i], res.start[i], res.steps,
                             error=progress_error(one, setup.optim)))
        return made

    # -- learned per-style networks (issue 13): states in and out, the runner keeps the files

    def refine_config(self, setup: Setup) -> OptimConfig:
        return dataclasses.replace(setup.optim, steps=self.settings.refine_steps, scales=(1.0,))

    def optim_for(self, job: Job) -> OptimConfig:
        """The optimiser `job` runs: its style's (per_style may set `steps`), or for a network's output
        refine_steps at full size. What the memory check and the progress line count, as `_batch` runs."""
        setup = self.setup(job.overrides)
        return self.refine_config(setup) if job.method == "network" else setup.optim

    def train(self, job: Job, photos: list[Image.Image], state: dict | None, until: int,
              on_loss: Callable[[int, losses.LossTerms], None] | None = None,
              should_pause: Callable[[int], bool] | None = None) -> dict:
        """Train the network of `job`'s style up to step `until` on `photos` (the collection's, decoded),
        from `state` (network.state_dict; None: afresh, seeded by `seed`), and return the new state.
        `should_pause(step)` lets the driver stop early to save a checkpoint; it calls again to go on."""
        setup = self.setup(job.overrides)  # the style's own weights and style size (per_style)
        s = setup.settings
        if s.colors != "style":  # the plan refuses it (training.assign): a network learns one set of targets
            raise ValueError(f"method network with colors {s.colors!r}")
        tensors = [to_tensor(im, s.size) for im in photos]  # on the CPU; each step's crops move to the device
        long_side = s.style_px(s.size)
        targets = (self.blend_targets(job.members, self._hash_of(job), long_side) if job.members
                   else self.style_targets(Path(job.style_path), self._hash_of(job), long_side))
        st = network.new_state(s.seed, self.device) if state is None else network.from_state_dict(state, self.device)
        network.train_steps(st, self.net, setup.objective, tensors, targets, until, self.optim.autocast_dtype,
                            on_loss, (lambda t: should_pause(t.step)) if should_pause else None)
        return network.state_dict(st)

    def _model_key(self, job: Job) -> str:
        return job.model if job.model is not None else self._hash_of(job)

    def load_model(self, job: Job, state: dict) -> None:
        """Use this trained state for `job`'s model (Job.model; Job.method network)."""
        self._models[self._model_key(job)] = network.from_state_dict(state, self.device).net.eval()

    def has_model(self, job: Job) -> bool:
        return self._model_key(job) in self._models

    def model(self, key: str) -> network.TransformerNet:
        """A loaded network by its key: the model's recipe (Job.model), else the style hash."""
        if key not in self._models:
            raise PairError("internal", "no trained network for this style was loaded")
        return self._models[key]

    def _make_with_oom_retry(self, jobs: list[Job], ims: list, on_log: OnLog | None,
                             on_note: Callable[[str], None], size: int) -> list[Made]:
        """Before starting, the batch's predicted peak (memory.need) is compared with the free memory: a batch
        that would not fit is split into single jobs, and a single job that would not fit fails as `oom`
        naming the largest size that would (on Linux a CPU run past its memory is killed, not told). A real
        out-of-memory error does the same: a batch is split, a single job fails. Never made smaller instead:
        an image marked done must be the size its recipe says."""
        w, h = images.fit_long_side(*ims[0].size, size)
        free = self.free_memory(self.device)
        cfg = self.optim_for(jobs[0])  # the batch's own steps (one style, one method): L-BFGS's history grows with them
        predicted = memory.need(h, w, len(jobs), cfg.optimizer, cfg.steps)
        if free is None or predicted.bytes <= free:
            try:
                return self._batch(jobs, ims, size, on_log)
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
            return [m for job, im in zip(jobs, ims) for m in self._make_with_oom_retry([job], [im], on_log, on_note, size)]
        fits = None if free is None else memory.largest_fitting(*ims[0].size, free, 1, cfg.optimizer, cfg.steps, below)
        advice = f"{fits} px would fit" if fits else "no smaller size would fit"
        raise PairError("oom", f"{why}; {advice}; lower 'size'")

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
