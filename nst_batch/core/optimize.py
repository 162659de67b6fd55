"""Optimising the pixels of an output image (or a batch of them) at one size: `optimize_scale`.

One *step* is one evaluation of the objective: a VGG forward pass plus the gradient with
respect to the pixels. That is what costs time, for L-BFGS (core/lbfgs.py: one evaluation an
iteration, each image of a batch on its own) and for Adam alike, and it is what the seed tutorial counted.
The pyramid over sizes (coarse to fine) is `pyramid.stylize`; `progress_error` is the check
that an optimisation went somewhere. L-BFGS's chunks run eagerly (`EagerChunks`) or, on CUDA, as a
replayed CUDA graph (`GraphChunks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import lbfgs, losses
from ..errors import PairError


@dataclass(frozen=True)
class OptimConfig:
    """No defaults: a run's comes from its Settings (engine.optim_config), a test's spells its own out."""

    steps: int
    optimizer: str  # lbfgs or adam
    lr: float  # Adam's
    scales: tuple[float, ...]
    init: str  # content or noise
    seed: int
    log_every: int
    stop_window: int  # 0: never stop early
    stop_tolerance: float
    autocast_dtype: torch.dtype | None  # bf16 on CUDA: VGG forward only; Grams and losses stay fp32
    channels_last: bool


@dataclass(frozen=True)
class LogRow:
    step: int  # steps so far, counted over all scales
    px: int  # long side of the image at this scale
    content: float
    style: float
    tv: float
    total: float
    elapsed_s: float


@dataclass
class Result:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], on the CPU
    final: list[LogRow]  # one per image: the losses of the image as written
    steps: int  # the batch's (the most any image took)
    start: list[LogRow] = field(default_factory=list)  # one per image: the loss of doing nothing, at full size
    each: list[int] = field(default_factory=list)  # steps per image (an image stops on its own); [] unknown


Values = list[tuple[float, float, float, float]]  # per image: content, style, tv, total (host floats)
Log = Callable[[Values, int], None]


@dataclass
class ScaleResult:
    image: torch.Tensor  # the best image seen, per image of the batch, inside [0, 1]
    steps: int  # steps this scale took (L-BFGS: the most any image of the batch took before it stopped)
    last: Values | None  # the terms of its last step (None: no step ran)
    each: list[int] = field(default_factory=list)  # steps per image: each stops on its own (L-BFGS)


# L-BFGS iterations between two host reads. One read a chunk (the chunk's recorded loss terms, which images
# have stopped and how many steps each took, in one transfer): on an H200 the old optimiser read the loss
# 8.5 times per evaluation and the GPU sat 97% idle (docs/benchmarks.md, "GPU"). 10: at most 9 wasted
# evaluations after the last image stops, and 0.1 reads per evaluation (benchmarks/lbfgs-results.md).
CHUNK = 10


class _Stop(Exception):
    """Raised inside Adam's closure to end a scale: its step budget is spent, or the stop rule fired."""


def converged(history: list[float], window: int, tolerance: float) -> bool:
    """The stop rule, on the per-step summed loss of one scale: the loss moved by at most `tolerance`
    (relative) over the last `window` steps. abs(): a spike is not convergence. (Adam's; L-BFGS applies
    the same rule to each image's own loss, on the device: lbfgs.step.)"""
    if not window or len(history) <= window:
        return False
    old, now = history[-1 - window], history[-1]
    return abs(old - now) <= tolerance * abs(old)


def values_of(terms: losses.LossTerms) -> Values:
    """The terms per image as host floats: one read."""
    rows = torch.stack([terms.content, terms.style, terms.tv, terms.total], 1).detach().float().tolist()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _nonfinite(step: int, value: float) -> PairError:
    return PairError("nonfinite", f"the loss became {value} at step {step}; "
                     "try lower weights, optimizer adam or precision fp32")


def optimize_scale(start: torch.Tensor, evaluate: Callable[[torch.Tensor], losses.LossTerms], cfg: OptimConfig,
                   log: Log, steps_before: int = 0, runner: ChunkRunner | None = None) -> ScaleResult:
    """Optimise the pixels of `start` (B, 3, h, w) for at most `cfg.steps` steps, or until the stop rule
    fires. `evaluate(img)` gives the weighted loss terms; `log(values, steps so far)` is called every
    `log_every` steps (steps counted from `steps_before`, over all scales). Returns the best image seen.
    `runner`: how L-BFGS's chunks run (GraphChunks: a CUDA graph where it can; default eager)."""
    if cfg.optimizer == "lbfgs":
        return _lbfgs_scale(start, evaluate, cfg, log, steps_before, runner)
    return _adam_scale(start, evaluate, cfg, log, steps_before)


class Recorder:
    """L-BFGS's evaluate for `lbfgs`, recording each evaluation's terms per image on the device: slot i of
    `rec` (CHUNK, 4, B) gets the i-th evaluation since `slot` was last set to 0. A Python counter, so a CUDA
    graph captured over a chunk writes the same slots on every replay."""

    def __init__(self, evaluate: Callable[[torch.Tensor], losses.LossTerms], batch: int, device: torch.device):
        self.evaluate = evaluate
        self.rec = torch.zeros(CHUNK, 4, batch, device=device)
        self.slot = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            terms = self.evaluate(x)
            (g,) = torch.autograd.grad(terms.total.sum(), x)  # images are independent: each its own gradient
        with torch.no_grad():
            self.rec[self.slot] = torch.stack([terms.content, terms.style, terms.tv, terms.total]).float()
        self.slot += 1
        return terms.total.detach().float(), g


class EagerChunks:
    """How a chunk of L-BFGS iterations runs: as they come, the default and always the CPU's
    (GraphChunks replays a CUDA graph instead)."""

    def __call__(self, st: lbfgs.State, fn: Recorder, n: int, window: int, tolerance: float) -> None:
        lbfgs.run_chunk(st, fn, n, window=window, tolerance=tolerance)

    def release(self) -> None:
        """The scale is over: drop whatever was kept for it."""


ChunkRunner = EagerChunks


# -- CUDA graphs for a chunk --------------------------------------------------------------------------------
#
# L-BFGS chunks replayed as a CUDA graph: one launch for a whole chunk of iterations.
#
# Measured on an H200 (docs/benchmarks.md, "GPU"): the card sat 97% idle, the host launching hundreds
# of small kernels per evaluation (VGG's convolutions, the Gram matrices, the losses, the L-BFGS update)
# and waiting on the loss. core/lbfgs.py removed the waits; a CUDA graph removes the launches: a chunk of
# CHUNK iterations is captured once per scale (the batch's shape fixes every tensor's shape) and
# replayed. Everything a chunk reads is a static tensor of that scale: lbfgs.State (updated in place), the
# recorder's buffer, the net's weights, and the content and style targets the evaluate closes over.
#
# `GraphChunks` is a ChunkRunner: the first full chunk of a scale runs eagerly on a side stream
# (the warm-up torch.cuda.graphs asks for: cuDNN picks its kernels, autograd sets up its streams), the
# next one is captured, and it and every later full chunk are replays. A shorter chunk (a scale's last)
# runs eagerly. Any failure to capture is noted once and the engine goes on eagerly; on a CPU (or any
# device but CUDA) nothing is ever captured. Whether to use it at all is DeviceConfig.cuda_graphs.


def _on_cuda(st: lbfgs.State) -> bool:
    return st.x.is_cuda


def _side_stream(work: Callable[[], None], device: torch.device) -> None:
    """`work` on a side stream, ordered after and before the current one (CUDA); as is elsewhere."""
    if device.type != "cuda":
        work()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)


def _capture(work: Callable[[], None], device: torch.device) -> "torch.cuda.CUDAGraph":
    """`work`'s kernels captured into a graph, none of them run (replay runs them)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the driver's I/O threads (decoding, encoding) may touch CUDA meanwhile; only this
    # thread's work must stay out of the captured stream.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        work()
    return graph


class GraphChunks(EagerChunks):
    """Full chunks of a scale as one CUDA graph; see the module's docstring. `note` hears, once, why
    capturing failed; `usable(state)` says whether a state's device can be captured (a test forces it)."""

    def __init__(self, note: Callable[[str], None], usable: Callable[[lbfgs.State], bool] = _on_cuda):
        self.note, self.usable = note, usable
        self.broken = False  # capture failed once: eager from then on, for this engine
        self.captures = 0  # graphs captured (a test and the benchmark read it)
        self.release()

    def release(self) -> None:
        """Forget the scale's graph (and the state it holds on to): its memory pool goes back."""
        self._for: tuple[lbfgs.State, Recorder] | None = None
        self._graph = None
        self._warm = False

    def __call__(self, st: lbfgs.State, fn: Recorder, n: int, window: int, tolerance: float) -> None:
        if self.broken or n != CHUNK or not self.usable(st):
            return super().__call__(st, fn, n, window, tolerance)
        if self._for is None or self._for[0] is not st or self._for[1] is not fn:
            self.release()
            self._for = (st, fn)

        def chunk() -> None:
            lbfgs.run_chunk(st, fn, n, window=window, tolerance=tolerance)

        if not self._warm:
            _side_stream(chunk, st.x.device)
            self._warm = True
            return None
        if self._graph is None:
            slot = fn.slot
            try:
                self._graph = _capture(chunk, st.x.device)
            except Exception as e:  # noqa: BLE001  (whatever it was, eager still works)
                self.broken = True
                fn.slot = slot
                self.note(f"CUDA graph capture failed ({type(e).__name__}: {e}); running without graphs")
                return super().__call__(st, fn, n, window, tolerance)
            fn.slot = slot  # capturing ran no kernel: the replay below makes the chunk
            self.captures += 1
        slot = fn.slot
        self._graph.replay()
        fn.slot = slot + n  # the slots its capture wrote, which it wrote again
        return None


def _lbfgs_scale(start: torch.Tensor, evaluate: Callable[[torch.Tensor], losses.LossTerms], cfg: OptimConfig,
                 log: Log, steps_before: int, runner: ChunkRunner | None) -> ScaleResult:
    """lbfgs.State per image (its own step, history and stop rule), CHUNK iterations between host reads.
    The first chunk holds the first evaluation and CHUNK - 1 iterations, every later one CHUNK iterations,
    so each fills `rec` from slot 0 (what a CUDA graph of one chunk replays)."""
    runner = runner or EagerChunks()
    B = start.shape[0]
    fn = Recorder(evaluate, B, start.device)
    # At most one curvature pair an iteration: a short run needs no more slots (and the memory model counts them).
    history = max(1, min(lbfgs.HISTORY, cfg.steps - 1))
    st = lbfgs.init_state(start, fn, history, cfg.stop_window)
    made, scale_steps, last = 1, 0, None
    while True:
        n = min(CHUNK - fn.slot, cfg.steps - made)
        if n > 0:
            runner(st, fn, n, cfg.stop_window, cfg.stop_tolerance)
        evals, made = fn.slot, made + max(n, 0)
        # The chunk's one host read: every evaluation's terms, which images stopped, their step counts.
        flat = torch.cat([fn.rec[:evals].flatten(), st.done.float(), st.steps.float()]).tolist()
        fn.slot = 0
        terms = [[tuple(flat[(e * 4 + k) * B + i] for k in range(4)) for i in range(B)] for e in range(evals)]
        done, steps = flat[evals * 4 * B:evals * 4 * B + B], flat[evals * 4 * B + B:]
        scale_steps = int(max(steps))  # evaluations past it were made for stopped images only
        for e, values in enumerate(terms):
            step = made - evals + e + 1  # this scale's step
            if step > scale_steps:
                break
            bad = next((v[3] for v in values if not math.isfinite(v[3])), None)
            if bad is not None:
                raise _nonfinite(steps_before + step, bad)
            last = values
            if step % cfg.log_every == 0:
                log(values, steps_before + step)
        if made >= cfg.steps or all(done):
            break
    runner.release()
    return ScaleResult(st.best_x.view(st.shape), scale_steps, last, [int(k) for k in steps])


def _adam_scale(start: torch.Tensor, evaluate: Callable[[torch.Tensor], losses.LossTerms], cfg: OptimConfig,
                log: Log, steps_before: int) -> ScaleResult:
    """Adam as it always was: one host read a step (the stop rule and the non-finite check)."""
    v = start.detach().clone().contiguous().requires_grad_(True)  # a copy: never the caller's tensor
    history: list[float] = []  # the summed total after every step of this scale: the stop rule reads it
    scale_steps = 0
    last: list[losses.LossTerms | None] = [None]
    # The best image seen so far, per image of the batch: Adam can overshoot, and the tutorial kept whatever
    # the last step gave. Tracked with torch.where, so no host-device sync is added.
    best_x = start.detach().clone()
    best_loss = torch.full((start.shape[0],), float("inf"), device=start.device)
    opt = torch.optim.Adam([v], lr=cfg.lr)

    def closure() -> None:
        nonlocal scale_steps
        if scale_steps >= cfg.steps:
            raise _Stop
        opt.zero_grad(set_to_none=True)
        terms = evaluate(v)
        loss = terms.total.sum()  # images in a batch are independent: summing keeps their gradients apart
        loss.backward()
        with torch.no_grad():
            tot = terms.total.detach().float()
            better = tot < best_loss  # NaN compares False: a broken step is never kept
            best_loss.copy_(torch.where(better, tot, best_loss))
            best_x.copy_(torch.where(better.view(-1, 1, 1, 1), v.detach(), best_x))
        scale_steps += 1
        last[0] = terms
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _nonfinite(steps_before + scale_steps, value)
        history.append(value)
        if scale_steps % cfg.log_every == 0:
            log(values_of(terms), steps_before + scale_steps)
        if converged(history, cfg.stop_window, cfg.stop_tolerance):
            raise _Stop

    try:
        while True:
            closure()
            opt.step()
            with torch.no_grad():
                v.clamp_(0, 1)
    except _Stop:
        pass
    return ScaleResult(best_x, scale_steps, values_of(last[0]) if last[0] is not None else None,
                       [scale_steps] * start.shape[0])


# A pair is recorded done only when its final loss is at least 0.5% below the loss of doing nothing
# (Result.start). Measured (docs/benchmarks.md): runs that diverged and kept their start ended at 0.9962-0.9997
# of it (L-BFGS's first step is a fixed tiny one, so even they move a little); 2- to 4-step runs on the tests'
# 32-48 px images at 0.32-0.9947; 50-step runs far lower (tutorial < 0.01, gatys about 0.5).
MIN_PROGRESS = 0.005


def progress_error(res: Result, cfg: OptimConfig) -> PairError | None:
    """The `no_progress` failure for a one-image Result whose loss did not fall below its start, else None."""
    start, final = res.start[0].total, res.final[0].total
    if start <= 0 or final <= (1 - MIN_PROGRESS) * start:
        return None  # (a start of 0 is already the optimum: nothing to do is then right)
    hint = ("raise steps (L-BFGS needs 3 or more a scale: its first step is deliberately tiny)"
            if cfg.optimizer == "lbfgs" and cfg.steps < 3 else "lower style_weight or use layers: gatys")
    return PairError("no_progress", f"the loss ended at {final / start:.1%} of its start ({start:.4g} -> {final:.4g} "
                                    f"in {res.steps} steps), so the image is not a stylization; {hint}")
