"""One run, end to end: plan -> ledger -> engine -> outputs and loss log.

The `Engine` holds what is loaded once per run: the device, VGG19 and the style-target
cache. `run` claims pairs from the ledger (one at a time, or `batch` of one style) until none
is left, so any number of processes can share an output folder, and records every outcome;
one bad pair never stops the others.
"""

from __future__ import annotations

import math
import os
import signal
import time
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from . import images, losses
from .errors import EXIT_SIGINT, EXIT_SIGTERM, ConfigError, PairError
from .ledger import Ledger, Row, worker_id
from .manifest import Settings
from .names import skipped_line
from .optimize import LogRow, OptimConfig, Result, progress_error, stylize
from .plan import HashCache, file_hash, make_plan, recipe_settings
from .progress import Display
from .files import CONTACT_SHEET, REPORT_HTML, SUMMARY_CSV, THUMBS
from .losslog import LOSS_LOG, LossLog



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


# Styles whose decoded image and Gram targets the engine keeps, least recently used dropped first.
# Pairs are claimed style by style, so 2 (the style in use and the one before) redo nothing in a
# plain run. Measured for one style at 512 px, gatys: targets 2.33 MiB a scale whatever the size
# (4.66 MiB at scales [0.5, 1.0]); the decoded image 4 bytes a pixel (2.9 MiB for 1071×712).
STYLE_CACHE = 2


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the engine decides from the device, made in one place (`resolve`), so a test can build
    what a CUDA run would use and run it on the CPU: only the device then differs."""

    optim: OptimConfig  # including bf16 autocast and channels_last
    cudnn_benchmark: bool  # applied on a CUDA device only (Engine.__init__)


def resolve(settings: Settings, device_type: str, bf16_supported: bool = True) -> DeviceConfig:
    """The optimiser settings for a device type ('cuda', 'cpu', 'mps'). `bf16_supported` is the CUDA
    card's answer (torch.cuda.is_bf16_supported()); `precision: auto` means bf16 on CUDA when it says yes."""
    cuda = device_type == "cuda"
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda and bf16_supported)
    optim = OptimConfig(
        steps=settings.steps, optimizer=settings.optimizer, lr=settings.lr, scales=settings.scales,
        init=settings.init, seed=settings.seed, log_every=settings.log_every, stop_window=settings.stop_window,
        stop_tolerance=settings.stop_tolerance, autocast_dtype=torch.bfloat16 if bf16 else None,
        channels_last=cuda,
    )
    # The same few shapes repeat for hundreds of steps: let cuDNN pick the fastest kernels once.
    return DeviceConfig(optim, cudnn_benchmark=cuda)


class Engine:
    """VGG19 on the device, loaded once, and each style's Gram targets, computed once per size.

    `config` defaults to resolve(settings, device type); a test passes resolve(settings, "cuda") to run
    the GPU configuration on the CPU.
    """

    def __init__(self, settings: Settings, device: torch.device | None = None, config: DeviceConfig | None = None):
        from .vgg import load_vgg19

        self.settings = settings
        self.device = device or pick_device(settings.device)
        self.objective = losses.objective_from(settings.layers, settings.content_weight, settings.style_weight,
                                               settings.tv_weight)
        if config is None:
            cuda = self.device.type == "cuda"
            config = resolve(settings, self.device.type, cuda and torch.cuda.is_bf16_supported())  # GPU-only query
        self.config = config
        self.optim = config.optim
        if config.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # GPU-only line
        self.net = load_vgg19(settings.weights, self.objective.last_layer, self.device, settings.pooling)
        if self.optim.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if settings.compile:
            self.net.forward = torch.compile(self.net.forward, dynamic=False)
        # style hash -> decoded image or the PairError it raised; the STYLE_CACHE most recently used
        # styles only, with their targets (pairs run style by style: more would only grow memory)
        self._style_images: OrderedDict[str, object] = OrderedDict()
        self._style_targets: dict[tuple, losses.Targets] = {}
        self._style_hash: dict[Path, str] = {}
        self.style_passes = 0  # forward passes spent on style targets: the cache test counts them

    def _style_image(self, path: Path, key: str):
        if key in self._style_images:
            self._style_images.move_to_end(key)
        else:
            while len(self._style_images) >= STYLE_CACHE:
                old, _ = self._style_images.popitem(last=False)
                for k in [k for k in self._style_targets if k[0] == old]:
                    del self._style_targets[k]
            try:
                self._style_images[key] = images.load_rgb(path, self.settings.max_megapixels)
            except PairError as e:
                self._style_images[key] = PairError(e.kind, f"style {e}")
        im = self._style_images[key]
        if isinstance(im, PairError):
            raise im
        return im

    def style_targets(self, path: Path, style_hash: str, long_side: int) -> losses.Targets:
        im = self._style_image(path, style_hash)
        # A coarse scale of a small output could shrink a wide style under VGG's minimum: keep its
        # short side at MIN_SIDE at least (Gram matrices do not depend on the image size).
        long_side = max(long_side, math.ceil(images.MIN_SIDE * max(im.size) / min(im.size)))
        key = (style_hash, long_side, self.objective, self.settings.weights, self.settings.pooling)
        if key not in self._style_targets:
            t = images.to_tensor(im, long_side).to(self.device)
            if self.optim.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            amp = (torch.autocast(self.device.type, dtype=self.optim.autocast_dtype)
                   if self.optim.autocast_dtype else nullcontext())
            with torch.no_grad(), amp:
                feats = self.net(t, frozenset(self.objective.style_layers))
                self._style_targets[key] = losses.style_targets(self.objective, feats)
            self.style_passes += 1
        return self._style_targets[key]

    def make(self, rows: list[Row], content_ims: list, size: int, on_log=None):
        """Stylize pairs that share a style (contents already decoded, all the same shape at `size`)
        in one batch. Returns the optimize.Result, image i belonging to rows[i]."""
        s = self.settings
        content = torch.cat([images.to_tensor(im, size) for im in content_ims]).to(self.device)
        style_path = Path(rows[0].style_path)
        if style_path not in self._style_hash:  # the cache is keyed by content, not name: hash once per run
            self._style_hash[style_path] = file_hash(style_path)
        style_hash = self._style_hash[style_path]
        style_full = s.style_size or size
        full_long = max(content.shape[-2:])

        def style_for(h: int, w: int) -> losses.Targets:
            return self.style_targets(style_path, style_hash, max(16, round(style_full * max(h, w) / full_long)))

        return stylize(self.net, self.objective, content, style_for, self.optim, on_log)


class Interrupted(BaseException):
    """SIGINT/SIGTERM: a BaseException so no per-pair `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


class _Heartbeat:
    """Keeps this worker's claims alive from a thread of its own, with its own connection, however
    long a step takes. It beats for every pair held, from the claim until the ledger records the end."""

    def __init__(self, out: Path, worker: str, every: float):
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._beat, args=(out, worker, every), daemon=True)
        self._t.start()

    def hold(self, pair_id: int) -> None:
        with self._lock:
            self.held.add(pair_id)

    def drop(self, pair_id: int) -> None:
        with self._lock:
            self.held.discard(pair_id)

    def _beat(self, out, worker, every):
        ledger = Ledger(out)
        try:
            while not self._stop.wait(every):
                with self._lock:
                    ids = list(self.held)
                ledger.worker_heartbeat(worker)  # holds the folder to this worker's settings
                for pair_id in ids:
                    ledger.heartbeat(pair_id, worker)
        finally:
            ledger.close()

    def stop(self):
        self._stop.set()
        self._t.join()


class _Signals:
    """SIGINT/SIGTERM become `Interrupted`, but only while computing. During ledger bookkeeping
    (a claim just committed, a result being recorded) the signal waits until `check()`, so the
    ledger never holds a claim that nobody will release."""

    def __init__(self):
        self.computing = False
        self.pending: int | None = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._on) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        return False

    def _on(self, signum, frame):
        self.pending = signum  # also when raising: a library may wrap the exception in its own
        if self.computing:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)


def remove_stale_temporaries(out: Path, outputs: Iterable[str], min_age_s: float = 600.0) -> int:
    """Delete `.NAME.PID.tmp` files left by writers killed mid-write: their process is gone, or, for a
    folder shared between machines (where a PID means nothing), they are older than any write takes.

    Only our own: the temporaries files.write_atomic makes for a file nst-batch writes (an output of
    `outputs`, the report's files, a thumbnail) and the one older loss logs were made through. A
    user's `.notes.123.tmp` in OUT is none of these and stays."""
    ours = {*outputs, LOSS_LOG, REPORT_HTML, SUMMARY_CSV, CONTACT_SHEET}
    removed = 0
    now = time.time()
    for tmp in out.rglob(".*.tmp"):
        target, _, pid = tmp.name[1:-4].rpartition(".")
        rel = tmp.parent.relative_to(out) / target
        if not (rel.as_posix() in ours or (rel.parent.as_posix() == THUMBS and target.endswith(".jpg"))):
            continue
        try:
            old = now - tmp.stat().st_mtime > min_age_s
        except FileNotFoundError:
            continue
        if pid.isdigit() and (old or not _pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


@dataclass
class RunResult:
    counts: dict[str, int]  # ledger counts at the end, over the whole plan
    made: int = 0
    failed: int = 0
    worker: str = ""
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (pair name, kind, message)


def run(settings: Settings, display: Display, only_failed_kinds: list[str] | None = None,
        retry: bool = False) -> RunResult:
    """Make every pair of the plan that is not done yet. With retry=True, only the failed ones."""
    # The model and device first: a weights typo must fail before the ledger is touched, or the
    # recipe change it implies would send every finished pair back to pending.
    engine = Engine(settings)
    # The recipe records the precision actually used (auto means bf16 on CUDA, fp32 elsewhere).
    effective = settings.replace(precision="bf16" if engine.optim.autocast_dtype else "fp32")
    hashes = HashCache(Ledger.stored_hashes(settings.out))  # inputs unchanged since the last plan are not read
    plan = make_plan(effective, hashes)
    recipes = {(p.content, p.style): p.recipe for p in plan}
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    worker = worker_id()
    try:
        # Before anything changes: a live worker with other pixel settings refuses us (ConfigError).
        ledger.register(worker, recipe_settings(effective), settings.lease_s)
        ledger.store_hashes(*hashes.changes())
        remove_stale_temporaries(out, [p.output for p in plan] + ledger.outputs())
        only = None
        if retry:
            # Only the failed pairs change: their recipe becomes this retry's, the rest of the
            # ledger (and the settings a plain `run` compares against) stay as they were.
            only = set(ledger.requeue_failed(only_failed_kinds, plan))
        else:
            ledger.sync(plan, out, settings.lease_s)
            ledger.set_meta("settings", _absolute(settings).to_dict())
            ledger.set_meta("skipped", [k.to_dict() for k in plan.skipped])  # for the report
        if plan.skipped:
            display.note(f"{skipped_line(plan.skipped)}; report.html names them")
        counts = ledger.counts()
        already = counts["done"]
        todo = len(only) if only is not None else counts["pending"] + counts["running"]
        skipped_failed = 0 if retry else counts["failed"]
        if skipped_failed:
            display.note(f"{skipped_failed} failed pair(s) from earlier runs are left alone; "
                         f"'nst-batch retry {out}' re-runs them")
        if todo == 0:
            what = "no failed pairs to retry" if retry else f"all {already} pair(s) are done or failed"
            display.note(f"nothing to do in {out}: {what}")
            return RunResult(ledger.counts(), worker=worker)
        display.note(f"{todo} pair(s) to make on {engine.device}, {already} already done")
        return _work(ledger, engine, display, only, already, todo, recipes)
    finally:
        try:
            ledger.unregister(worker)
        finally:
            ledger.close()


def _absolute(settings: Settings) -> Settings:
    """Folders as absolute paths, so `retry` works from any directory."""
    return settings.replace(content=settings.content.resolve(), styles=settings.styles.resolve(),
                            out=settings.out.resolve())


class _BackgroundIO:
    """Decodes the next content image and encodes finished outputs on threads, overlapped with compute.

    Pillow releases the GIL while it decodes, resizes and encodes, so on a GPU the next pair's
    photo is ready and the last pair's PNG is written while VGG runs. A pair is marked done only
    after its file is on disk: a crash before that leaves it `running`, and it is redone.
    """

    def __init__(self, max_megapixels: float):
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nst-io")
        self.max_mp = max_megapixels
        self.loads: dict[str, Future] = {}
        self.writes: list[tuple[Row, Future, object, str | None]] = []

    def prefetch(self, path: str) -> None:
        # One look-ahead only: a photo another worker took instead must not pile up in memory.
        for other in [p for p in self.loads if p != path]:
            self.loads.pop(other).cancel()
        if path not in self.loads:
            self.loads[path] = self.pool.submit(images.load_rgb, Path(path), self.max_mp)

    def content(self, path: str):
        fut = self.loads.pop(path, None)
        return fut.result() if fut is not None else images.load_rgb(Path(path), self.max_mp)

    def write(self, row: Row, res, path: Path, fmt: str, quality: int, note: str | None) -> None:
        def save() -> float:
            try:
                images.save_atomic(images.to_pil(res.images[:1]), path, fmt, quality)
            except OSError as e:
                raise PairError("write", f"cannot write {path}: {e.strerror or e}") from None
            return time.time()  # the pair's end: the ledger may hear of it a little later

        self.writes.append((row, self.pool.submit(save), res, note))

    def finished(self, wait: bool = False):
        """Yield (row, result, note, error, finished_at) for writes that are over (all of them if wait)."""
        still = []
        for row, fut, res, note in self.writes:
            if wait or fut.done():
                error = fut.exception()
                yield row, res, note, error, (time.time() if error else fut.result())
            else:
                still.append((row, fut, res, note))
        self.writes = still

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _work(ledger: Ledger, engine: Engine, display: Display, only, already: int, todo: int,
          recipes: dict[tuple[str, str], str]) -> RunResult:
    s = engine.settings
    out = s.out
    worker = worker_id()
    result = RunResult({}, worker=worker)
    loss_log = LossLog(out)
    io = _BackgroundIO(s.max_megapixels)
    beat = _Heartbeat(out, worker, every=max(1.0, s.lease_s / 4))
    steps_per_pair = s.steps * len(s.scales)
    writing: set[int] = set()  # computed, file being written: kept (not released) on Ctrl-C

    def record_failure(row: Row, e: BaseException) -> None:
        name = f"{row.style} × {row.content}"
        kind, msg = (e.kind, str(e)) if isinstance(e, PairError) else ("internal", f"{type(e).__name__}: {e}")
        ledger.fail(row.id, worker, kind, msg)
        beat.drop(row.id)
        result.failed += 1
        result.failures.append((name, kind, msg))
        display.pair_end(name, False, time.time() - (row.started_at or time.time()), f"{kind}: {msg}")

    def settle(wait: bool = False) -> None:
        for row, res, note, error, finished_at in io.finished(wait):
            writing.discard(row.id)
            if error is not None:
                record_failure(row, error)
                continue
            f = res.final[0]
            recorded = ledger.done(row.id, worker, res.steps, f.content, f.style, f.tv, f.total, note, finished_at,
                                   recipe=row.recipe)
            beat.drop(row.id)
            if not recorded:  # our lease ran out (process stopped?) and the pair was reset meanwhile
                display.note(f"{row.style} × {row.content}: not recorded: this worker's claim on it had lapsed "
                             "and the pair was reset; it is made again with its current recipe")
                continue
            result.made += 1
            display.pair_end(f"{row.style} × {row.content}", True, finished_at - (row.started_at or finished_at),
                             note or "")

    def claim(style: str | None = None) -> Row | None:
        row = ledger.claim(worker, s.lease_s, only, style=style, recipes=recipes)
        if row is not None:
            beat.hold(row.id)
        return row

    display.start(already + todo, already)
    with _Signals() as signals:
        try:
            while (first := claim()) is not None:
                claimed = [first]
                while len(claimed) < s.batch and (r := claim(first.style)):
                    claimed.append(r)
                signals.check()
                groups = _decode_and_group(claimed, io, s.size, record_failure)
                nxt = ledger.peek(only, recipes)  # decoded on a thread while this batch computes
                if nxt is not None:
                    io.prefetch(nxt.content_path)
                for group in groups:
                    rows = [r for r, _ in group]
                    display.pair_start(" + ".join(f"{r.style} × {r.content}" for r in rows), steps_per_pair)
                    signals.computing = True
                    try:
                        made = _make_with_oom_retry(engine, rows, [im for _, im in group], loss_log, display)
                    except Exception as e:  # one pair's (or batch's) failure is recorded and the run goes on
                        signals.computing = False
                        signals.check()  # an Interrupted that a library wrapped is still a Ctrl-C
                        for r in rows:
                            record_failure(r, e)
                        continue
                    finally:
                        signals.computing = False
                    for r, note, res in made:
                        if isinstance(res, PairError):  # this image made no progress; the others of its batch did
                            record_failure(r, res)
                            continue
                        io.write(r, res, out / r.output, s.format, s.quality, note)
                        writing.add(r.id)
                    signals.check()
                settle()
                signals.check()
        except Interrupted:
            with beat._lock:
                unfinished = beat.held - writing
            for pair_id in unfinished:
                ledger.release(pair_id, worker)
                beat.drop(pair_id)
            raise
        finally:
            # Outputs already computed are worth keeping, even on Ctrl-C: wait for their files.
            settle(wait=True)
            beat.stop()
            io.close()
            display.close()
            loss_log.close()
    result.counts = ledger.counts()
    return result


def _decode_and_group(rows: list[Row], io: _BackgroundIO, size: int, record_failure) -> list[list]:
    """Decode each claimed pair's photo; return groups of (row, image) whose working shapes match,
    since only same-shape images can share a batch tensor. Undecodable photos fail right here."""
    groups: dict[tuple[int, int], list] = {}
    for r in rows:
        try:
            im = io.content(r.content_path)
        except Exception as e:
            record_failure(r, e)
            continue
        groups.setdefault(images.fit_long_side(*im.size, size), []).append((r, im))
    return list(groups.values())


def _make_with_oom_retry(engine: Engine, rows: list[Row], ims: list, loss_log: LossLog, display: Display,
                         size: int | None = None) -> list[tuple[Row, str | None, Result | PairError]]:
    """Make a batch of pairs. On out-of-memory a batch is split into single pairs, and a single pair is
    tried once more at half the pixels (same device: a GPU run stays fast). Returns (row, note, result), the
    result being a PairError for an image whose optimisation made no progress (the others are kept)."""
    size = size or engine.settings.size
    last_logged = [-1]

    def on_log(log_rows: list[LogRow]):
        for r, lr in zip(rows, log_rows):
            loss_log.write(r, r.attempts, [lr])
        last_logged[0] = log_rows[0].step
        display.step(log_rows[0].step, sum(lr.total for lr in log_rows) / len(log_rows))

    def make(px: int) -> list[tuple[Row, Result | PairError]]:
        res = engine.make(rows, ims, px, on_log)
        if res.final[0].step != last_logged[0]:  # the final row, unless the last logged step was the last step
            for r, f in zip(rows, res.final):
                loss_log.write(r, r.attempts, [f])
        made = []
        for i, r in enumerate(rows):
            one = Result(res.images[i:i + 1], [res.final[i]], res.steps, [res.start[i]])
            made.append((r, progress_error(one, engine.optim) or one))
        return made

    try:
        return [(r, None, res) for r, res in make(size)]
    except Exception as e:
        if not _is_oom(e):
            raise
    _free_memory(engine.device)
    if len(rows) > 1:
        display.note(f"a batch of {len(rows)} ran out of memory; making them one at a time")
        return [m for r, im in zip(rows, ims) for m in _make_with_oom_retry(engine, [r], [im], loss_log, display)]
    smaller = max(16, int(size / math.sqrt(2)))
    note = f"ran out of memory at {size} px; made at {smaller} px instead"
    display.note(f"{rows[0].style} × {rows[0].content}: {note}")
    try:
        return [(r, note, res) for r, res in make(smaller)]
    except Exception as e:
        if _is_oom(e):
            _free_memory(engine.device)
            raise PairError("oom", f"out of memory at {size} px and again at {smaller} px; lower 'size'") from None
        raise


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
