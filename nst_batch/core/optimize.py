"""Optimising the pixels of an output image (or a batch of them) at one size: `optimize_scale`.

One *step* is one evaluation of the objective: a VGG forward pass plus the gradient with
respect to the pixels. That is what costs time, for L-BFGS (where one iteration can take
more than one evaluation) and for Adam alike, and it is what the seed tutorial counted.
The pyramid over sizes (coarse to fine) is `pyramid.stylize`; `progress_error` is the check
that an optimisation went somewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import losses
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
    steps: int
    start: list[LogRow] = field(default_factory=list)  # one per image: the loss of doing nothing, at full size


@dataclass
class ScaleResult:
    image: torch.Tensor  # the best image seen, per image of the batch, inside [0, 1]
    steps: int  # steps this scale took
    last: losses.LossTerms | None  # the terms of its last step (None: no step ran)


# L-BFGS's first step, as the mean change of a pixel value (see optimize_scale).
FIRST_STEP = 0.01


class _Stop(Exception):
    """Raised inside the closure to end a scale: its step budget is spent, or the stop rule fired."""


def converged(history: list[float], window: int, tolerance: float) -> bool:
    """The stop rule, on the per-step summed loss of one scale: the loss moved by at most `tolerance`
    (relative) over the last `window` steps. abs(): an L-BFGS spike is not convergence."""
    if not window or len(history) <= window:
        return False
    old, now = history[-1 - window], history[-1]
    return abs(old - now) <= tolerance * abs(old)


def optimize_scale(start: torch.Tensor, evaluate: Callable[[torch.Tensor], losses.LossTerms], cfg: OptimConfig,
                   log: Callable[[losses.LossTerms, int], None], steps_before: int = 0) -> ScaleResult:
    """Optimise the pixels of `start` (B, 3, h, w) for at most `cfg.steps` steps, or until the stop rule
    fires. `evaluate(img)` gives the weighted loss terms; `log(terms, steps so far)` is called every
    `log_every` steps (steps counted from `steps_before`, over all scales). Returns the best image seen."""
    device = start.device
    # L-BFGS's first step moves the image by a total (L1) of 1 over all its values: on a 1024 px image
    # about 1e-6 a value, below what a bf16 forward can see (the image is cast to bf16 at the first
    # conv). The loss then does not change, and L-BFGS gives up after a handful of evaluations with
    # the photo unchanged (measured on an H200: docs/benchmarks.md, "GPU"). So L-BFGS works on
    # v = x / k: its first step then moves each value by 1% on average, and its later steps, scaled
    # by its own curvature estimate, do not depend on k.
    k = FIRST_STEP * start.numel() if cfg.optimizer == "lbfgs" else 1.0
    # The optimised pixels keep the default layout: L-BFGS flattens their gradient with .view(-1),
    # which fails on a channels_last tensor. The net gets a channels_last copy instead (3 channels: cheap).
    v = start.div(k).contiguous().requires_grad_(True)
    history: list[float] = []  # the summed total after every step of this scale: the stop rule reads it
    scale_steps = 0
    last: list[losses.LossTerms | None] = [None]
    # The best image seen so far, per image of the batch: Adam can overshoot, a line search tries points
    # worse than where it stands, and the tutorial kept whatever the last step gave. Tracked with
    # torch.where, so no host-device sync is added.
    best_x = start.detach().clone()
    best_loss = torch.full((start.shape[0],), float("inf"), device=device)
    unit: list[float | None] = [None]  # what L-BFGS sees is the loss over this, the scale's first loss

    def closure() -> torch.Tensor:
        nonlocal scale_steps
        if scale_steps >= cfg.steps:
            raise _Stop  # L-BFGS asks for one evaluation more than it may have (steps: 1 made two)
        with torch.no_grad():
            v.clamp_(0, 1 / k)  # the tutorial's trick: keep L-BFGS inside the valid pixel range
        opt.zero_grad(set_to_none=True)
        x = v * k
        terms = evaluate(x)
        loss = terms.total.sum()  # images in a batch are independent: summing keeps their gradients apart
        if unit[0] is None:
            first_loss = float(loss.detach()) if cfg.optimizer == "lbfgs" else 1.0  # one sync a scale
            unit[0] = first_loss if math.isfinite(first_loss) and first_loss > 0 else 1.0
        seen = loss / unit[0]
        seen.backward()
        with torch.no_grad():
            tot = terms.total.detach().float()
            better = tot < best_loss  # NaN compares False: a broken step is never kept
            best_loss.copy_(torch.where(better, tot, best_loss))
            best_x.copy_(torch.where(better.view(-1, 1, 1, 1), x.detach(), best_x))
        scale_steps += 1
        last[0] = terms
        # One host sync a step, which L-BFGS makes anyway (it reads float(loss)): the stop rule reads
        # every step, whatever log_every says (it used to run at log points only).
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PairError("nonfinite", f"the loss became {value} at step {steps_before + scale_steps}; "
                            "try lower weights, optimizer adam or precision fp32")
        history.append(value)
        if scale_steps % cfg.log_every == 0:
            log(terms, steps_before + scale_steps)
        if converged(history, cfg.stop_window, cfg.stop_tolerance):
            raise _Stop
        return seen

    try:
        if cfg.optimizer == "lbfgs":
            opt = _lbfgs(v, cfg.steps)
            opt.step(closure)
        else:
            opt = torch.optim.Adam([v], lr=cfg.lr)
            while True:
                closure()
                opt.step()
                with torch.no_grad():
                    v.clamp_(0, 1)
    except _Stop:
        pass
    return ScaleResult(best_x, scale_steps, last[0])


def _lbfgs(v: torch.Tensor, steps: int) -> torch.optim.LBFGS:
    """A strong-Wolfe line search, on the loss divided by the scale's first loss. The tutorial's L-BFGS
    (no line search, lr 1) jumps to a far worse point when the objective is badly scaled (its own weights
    on Caffe-scaled features: 1e13 at the start) and never comes back, and the line search's cubic
    interpolation overflows float32 on losses that large; normalised, it works for every objective
    (measured: docs/benchmarks.md, "Recovery"). The closure ends the scale when its budget is spent or the
    stop rule fires, so L-BFGS's own limits stay above the budget, and tolerance_grad is off: on a
    normalised loss its absolute 1e-7 could stop a large image early."""
    return torch.optim.LBFGS([v], lr=1.0, max_iter=steps + 1, max_eval=steps + 1, tolerance_grad=0.0,
                             history_size=100, line_search_fn="strong_wolfe")


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
