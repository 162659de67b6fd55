"""The engine: what is loaded once per process, and the pure work of turning pairs into images.

`resolve` decides, once, everything that depends on the device (precision, memory layout, cuDNN);
the plan's recipe and the optimiser both read its answer. An `Engine` holds VGG19 on the device and
a bounded cache of style targets, and `make(jobs)` returns one `Made` per job: the image, its loss
rows, its final and starting losses, a note (an out-of-memory retry at a smaller size) or the
`PairError` that failed it. It writes no file, touches no ledger and handles no signal, so a
driver on another process or machine can run it and send the results back (`encode` turns an
image into PNG/JPEG bytes for that); `runner` is the local driver.
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

from . import images, losses, network
from .errors import ConfigError, PairError
from .images import MIN_SIDE
from .manifest import Settings
from .objective import objective_from
from .optimize import LogRow, OptimConfig, Result, progress_error
from .plan import file_hash
from .pyramid import stylize

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
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {settings.precision!r} is not resolved yet: use resolve()")
    return OptimConfig(
        steps=settings.steps, optimizer=settings.optimizer, lr=settings.lr, scales=settings.scales,
        init=settings.init, seed=settings.seed, log_every=settings.log_every, stop_window=settings.stop_window,
        stop_tolerance=settings.stop_tolerance,
        autocast_dtype=torch.bfloat16 if settings.precision == "bf16" else None, channels_last=channels_last)


@dataclass(frozen=True)
class DeviceConfig:
    """Everything decided from the device, made in one place (`resolve`), so a test can build what a
    CUDA run would use and run it on the CPU: only the device then differs."""

    settings: Settings  # precision resolved to fp32 or bf16: what the plan's recipe records
    optim: OptimConfig  # including bf16 autocast and channels_last
    cudnn_benchmark: bool  # applied on a CUDA device only (Engine.__init__)


def resolve(settings: Settings, device_type: str, bf16_supported: bool = True) -> DeviceConfig:
    """The settings for a device type ('cuda', 'cpu', 'mps'). `bf16_supported` is the CUDA card's answer
    (torch.cuda.is_bf16_supported()); `precision: auto` means bf16 on CUDA when it says yes."""
    cuda = device_type == "cuda"
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda and bf16_supported)
    resolved = settings.replace(precision="bf16" if bf16 else "fp32")
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


def encode(image: torch.Tensor | Image.Image, fmt: str, quality: int = 95) -> bytes:
    """A (1, 3, H, W) image (or its to_pil) as the bytes of a PNG or JPEG file: what crosses a process
    boundary. A caller that also makes a thumbnail passes the PIL image, converted once."""
    buf = io.BytesIO()
    images.encode_to(image if isinstance(image, Image.Image) else to_pil(image), buf, fmt, quality)
    return buf.getvalue()


# -- pairs in, results out -------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One pair to make. `content`/`style` name it (loss rows, notes); `style_hash` keys the style cache
    by content (the plan's hash; None: hashed here, once per path); `image` is the photo already decoded
    (a driver that decodes on a thread of its own), else the engine decodes it."""

    content: str
    style: str
    content_path: Path
    style_path: Path
    style_hash: str | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    method: str = "optimize"  # or "network": the style's model (Engine.load_model) then refine_steps of L-BFGS


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
    note: str | None = None  # e.g. "ran out of memory at 512 px; made at 362 px instead"
    error: PairError | None = None

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

    def __init__(self, settings: Settings, device: torch.device | None = None, config: DeviceConfig | None = None):
        from .vgg import load_vgg19

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
        self._models: dict[str, network.TransformerNet] = {}  # style hash -> trained network
        self.style_passes = 0  # forward passes spent on style targets: the cache test counts them

    # -- style targets

    def _style_image(self, path: Path, key: str):
        if key in self._style_images:
            self._style_images.move_to_end(key)
        else:
            while len(self._style_images) >= STYLE_IMAGES:
                self._style_images.popitem(last=False)
            try:
                self._style_images[key] = images.load_rgb(path, self.settings.max_megapixels)
            except PairError as e:
                self._style_images[key] = PairError(e.kind, f"style {e}")
        im = self._style_images[key]
        if isinstance(im, PairError):
            raise im
        return im

    def style_targets(self, path: Path, style_hash: str, long_side: int) -> losses.Targets:
        held = self._style_targets.get(style_hash)
        if held is not None:
            self._style_targets.move_to_end(style_hash)
            if long_side in held:
                return held[long_side]
        im = self._style_image(path, style_hash)
        # A coarse scale of a small output could shrink a wide style under VGG's minimum: keep its
        # short side at MIN_SIDE at least (Gram matrices do not depend on the image size).
        side = max(long_side, math.ceil(MIN_SIDE * max(im.size) / min(im.size)))
        if held is None:
            while len(self._style_targets) >= STYLE_CACHE:
                self._style_targets.popitem(last=False)
            held = self._style_targets[style_hash] = {}
        if side not in held:
            t = to_tensor(im, side).to(self.device)
            if self.optim.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            amp = (torch.autocast(self.device.type, dtype=self.optim.autocast_dtype)
                   if self.optim.autocast_dtype else nullcontext())
            with torch.no_grad(), amp:
                feats = self.net(t, frozenset(self.objective.style_layers))
                held[side] = losses.style_targets(self.objective, feats)
            self.style_passes += 1
        held[long_side] = held[side]  # asked for by the requested size next time (objective and weights are the engine's own)
        return held[side]

    def _hash_of(self, job: Job) -> str:
        if job.style_hash is not None:
            return job.style_hash
        path = Path(job.style_path)
        if path not in self._style_hash:  # the cache is keyed by content, not name: hash once per process
            self._style_hash[path] = file_hash(path)
        return self._style_hash[path]

    # -- making

    def make(self, jobs: list[Job], on_log: OnLog | None = None,
             on_note: Callable[[str], None] | None = None) -> list[Made]:
        """One Made per job, in order. Jobs of one style whose photos share a working shape are optimised
        together in batches of up to `batch`; a failure (an undecodable photo, no progress, out of memory
        twice, a non-finite loss) fails its own job or batch only. `on_log(job, row)` hears every loss row
        as it is made (the rows are in Made.logs too); `on_note` hears what the out-of-memory policy did."""
        made: list[Made | None] = [None] * len(jobs)
        groups: dict[tuple, list[tuple[int, Image.Image]]] = {}
        for i, job in enumerate(jobs):
            try:
                im = job.image if job.image is not None else images.load_rgb(Path(job.content_path),
                                                                             self.settings.max_megapixels)
            except PairError as e:
                made[i] = Made(job, error=e)
                continue
            key = (str(job.style_path), images.fit_long_side(*im.size, self.settings.size), job.method)
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
                    made[i] = m
        assert all(m is not None for m in made)
        return made  # type: ignore[return-value]

    def _batch(self, jobs: list[Job], ims: list, size: int, on_log: OnLog | None) -> list[Made]:
        """Stylize jobs that share a style and a working shape in one batch tensor."""
        content = torch.cat([to_tensor(im, size) for im in ims]).to(self.device)
        style_path, style_hash = Path(jobs[0].style_path), self._hash_of(jobs[0])
        style_full = self.settings.style_size or size
        full_long = max(content.shape[-2:])
        logs: list[list[LogRow]] = [[] for _ in jobs]

        def style_for(h: int, w: int) -> losses.Targets:
            return self.style_targets(style_path, style_hash, max(MIN_SIDE, round(style_full * max(h, w) / full_long)))

        def logged(rows: list[LogRow]) -> None:
            for job, log, row in zip(jobs, logs, rows):
                log.append(row)
                if on_log:
                    on_log(job, row)

        if jobs[0].method == "network":  # one forward pass, then refine_steps at full size from it
            res = stylize(self.net, self.objective, content, style_for, self.refine_config(), logged,
                          init=network.apply(self.model(style_hash), content))
        else:
            res = stylize(self.net, self.objective, content, style_for, self.optim, logged)
        made = []
        for i, job in enumerate(jobs):
            if not logs[i] or logs[i][-1].step != res.final[i].step:  # the final row, unless already logged
                logged_final = res.final[i]
                logs[i].append(logged_final)
                if on_log:
                    on_log(job, logged_final)
            one = Result(res.images[i:i + 1], [res.final[i]], res.steps, [res.start[i]])
            made.append(Made(job, one.images, logs[i], res.final[i], res.start[i], res.steps,
                             error=progress_error(one, self.optim)))
        return made

    # -- learned per-style networks (issue 13): states in and out, the runner keeps the files

    def refine_config(self) -> OptimConfig:
        return dataclasses.replace(self.optim, steps=self.settings.refine_steps, scales=(1.0,))

    def train(self, job: Job, photos: list[Image.Image], state: dict | None, until: int,
              on_loss: Callable[[int, losses.LossTerms], None] | None = None,
              should_pause: Callable[[int], bool] | None = None) -> dict:
        """Train the network of `job`'s style up to step `until` on `photos` (the collection's, decoded),
        from `state` (network.state_dict; None: afresh, seeded by `seed`), and return the new state.
        `should_pause(step)` lets the driver stop early to save a checkpoint; it calls again to go on."""
        s = self.settings
        tensors = [to_tensor(im, s.size) for im in photos]  # on the CPU; each step's crops move to the device
        targets = self.style_targets(Path(job.style_path), self._hash_of(job), s.style_size or s.size)
        st = network.new_state(s.seed, self.device) if state is None else network.from_state_dict(state, self.device)
        network.train_steps(st, self.net, self.objective, tensors, targets, until, self.optim.autocast_dtype,
                            on_loss, (lambda t: should_pause(t.step)) if should_pause else None)
        return network.state_dict(st)

    def load_model(self, job: Job, state: dict) -> None:
        """Use this trained state for `job`'s style (Job.method network)."""
        self._models[self._hash_of(job)] = network.from_state_dict(state, self.device).net.eval()

    def has_model(self, job: Job) -> bool:
        return self._hash_of(job) in self._models

    def model(self, style_hash: str) -> network.TransformerNet:
        if style_hash not in self._models:
            raise PairError("internal", "no trained network for this style was loaded")
        return self._models[style_hash]

    def _make_with_oom_retry(self, jobs: list[Job], ims: list, on_log: OnLog | None,
                             on_note: Callable[[str], None], size: int) -> list[Made]:
        """On out-of-memory a batch is split into single jobs, and a single job is tried once more at half the
        pixels (same device: a GPU run stays fast); out of memory again fails it as `oom`."""
        try:
            return self._batch(jobs, ims, size, on_log)
        except Exception as e:
            if not is_oom(e):
                raise
        self._free_memory()
        if len(jobs) > 1:
            on_note(f"a batch of {len(jobs)} ran out of memory; making them one at a time")
            return [m for job, im in zip(jobs, ims) for m in self._make_with_oom_retry([job], [im], on_log, on_note, size)]
        smaller = max(MIN_SIDE, int(size / math.sqrt(2)))
        note = f"ran out of memory at {size} px; made at {smaller} px instead"
        on_note(f"{jobs[0].style} × {jobs[0].content}: {note}")
        try:
            made = self._batch(jobs, ims, smaller, on_log)
        except Exception as e:
            if is_oom(e):
                self._free_memory()
                raise PairError("oom", f"out of memory at {size} px and again at {smaller} px; lower 'size'") from None
            raise
        for m in made:
            m.note = note
        return made

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
