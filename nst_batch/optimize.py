"""Optimising the pixels of an output image (or a batch of them) against an Objective.

One *step* is one evaluation of the objective: a VGG forward pass plus the gradient with
respect to the pixels. That is what costs time, for L-BFGS (where one iteration can take
more than one evaluation) and for Adam alike, and it is what the seed tutorial counted.

Coarse to fine: with `scales = (0.5, 1.0)` the image is first optimised at half size, then
upsampled and refined at full size. Each scale runs `steps` steps; a half-size step costs
about a quarter of a full one, and the full-size steps start close to the answer.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import losses
from .errors import PairError
from .images import MIN_SIDE
from .losses import Objective, Targets
from .vgg import VGGFeatures, resize


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 300
    optimizer: str = "lbfgs"
    lr: float = 0.02
    scales: tuple[float, ...] = (1.0,)
    init: str = "content"
    seed: int = 0
    log_every: int = 10
    stop_window: int = 0  # 0: never stop early
    stop_tolerance: float = 1e-3
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA: VGG forward only; Grams and losses stay fp32
    channels_last: bool = False


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


class _Stop(Exception):
    """Raised inside the closure to end a scale: its step budget is spent, or the stop rule fired."""


def scale_shapes(height: int, width: int, scales: tuple[float, ...]) -> list[tuple[int, int]]:
    """Working (H, W) per scale, dropping coarse scales too small for VGG19."""
    shapes = []
    for s in scales:
        h, w = max(1, round(height * s)), max(1, round(width * s))
        if (min(h, w) >= MIN_SIDE or s == 1.0) and (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def converged(history: list[float], window: int, tolerance: float) -> bool:
    """The stop rule, on the per-step summed loss of one scale: the loss moved by at most `tolerance`
    (relative) over the last `window` steps. abs(): an L-BFGS spike is not convergence."""
    if not window or len(history) <= window:
        return False
    old, now = history[-1 - window], history[-1]
    return abs(old - now) <= tolerance * abs(old)


def stylize(net: VGGFeatures, obj: Objective, content: torch.Tensor,
            style_for: Callable[[int, int], Targets], cfg: OptimConfig,
            on_log: Callable[[list[LogRow]], None] | None = None) -> Result:
    """Optimise a batch of B output images, each starting from its content image.

    `content` is (B, 3, H, W) in [0, 1] on the net's device; all B share one size.
    `style_for(h, w)` returns the style Targets for a working size (the caller caches them).
    `on_log` gets one LogRow per image every `log_every` steps and at the end of each coarse scale;
    the final losses come back in Result.final, and the losses of doing nothing (the starting image,
    measured at full size) in Result.start.
    """
    t0 = time.perf_counter()
    device = content.device
    amp = torch.autocast(device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype else nullcontext()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    steps_done = 0
    x: torch.Tensor | None = None
    first: torch.Tensor | None = None  # the first scale's starting image
    start_rows: list[LogRow] = []
    H, W = content.shape[-2:]

    def rows_of(terms: losses.LossTerms, px: int) -> list[LogRow]:
        vals = torch.stack([terms.content, terms.style, terms.tv, terms.total], 1).detach().float().cpu()
        el = time.perf_counter() - t0
        return [LogRow(steps_done, px, *map(float, v), el) for v in vals]

    shapes = scale_shapes(H, W, cfg.scales)
    for h, w in shapes:
        px = max(h, w)
        c_img = resize(content, h, w).contiguous(memory_format=fmt)
        with torch.no_grad(), amp:
            c_tgt = losses.content_targets(obj, net(c_img, frozenset(obj.content_layers)))
        s_tgt = style_for(h, w)

        def evaluate(img: torch.Tensor) -> losses.LossTerms:
            with amp:
                feats = net(img.contiguous(memory_format=fmt), obj.layers)
            return losses.compute(obj, feats, img, c_tgt, s_tgt)

        if x is None:
            start = c_img if cfg.init == "content" else torch.rand(c_img.shape, generator=gen).to(device)
            first = start
        else:
            prev = x.detach()
            start = resize(prev, h, w)
            if cfg.init == "content":
                # Upsampling blurs, and the fine style layers then start far above where content init
                # would put them. Put back the content detail the coarser scale could not hold (one
                # Laplacian-pyramid level): measured, this is what makes coarse-to-fine pay off.
                start = start + c_img - resize(resize(c_img, *prev.shape[-2:]), h, w)
            start = start.clamp(0, 1)
        if (h, w) == shapes[-1]:
            # What doing nothing scores at full size: the photo itself (or the first noise, upsampled).
            # The runner compares the final loss with it, so an optimisation that went nowhere is never
            # recorded as a stylization. One forward pass, without gradients.
            assert first is not None
            with torch.no_grad():
                start_rows = rows_of(evaluate(c_img if cfg.init == "content" else resize(first, h, w)), px)
        # The optimised pixels keep the default layout: L-BFGS flattens their gradient with .view(-1),
        # which fails on a channels_last tensor. The net gets a channels_last copy instead (3 channels: cheap).
        x = start.clone().contiguous().requires_grad_(True)
        history: list[float] = []  # the summed total after every step of this scale: the stop rule reads it
        scale_steps = 0
        last: list[losses.LossTerms | None] = [None]
        # The best image seen so far, per image of the batch: Adam can overshoot, a line search tries points
        # worse than where it stands, and the tutorial kept whatever the last step gave. Tracked with
        # torch.where, so no host-device sync is added.
        best_x = x.detach().clone()
        best_loss = torch.full((x.shape[0],), float("inf"), device=device)
        unit: list[float | None] = [None]  # what L-BFGS sees is the loss over this, the scale's first loss

        def log(terms: losses.LossTerms) -> None:
            if on_log:
                on_log(rows_of(terms, px))

        def closure() -> torch.Tensor:
            nonlocal steps_done, scale_steps
            if scale_steps >= cfg.steps:
                raise _Stop  # L-BFGS asks for one evaluation more than it may have (steps: 1 made two)
            with torch.no_grad():
                x.clamp_(0, 1)  # the tutorial's trick: keep L-BFGS inside the valid pixel range
            opt.zero_grad(set_to_none=True)
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
            steps_done += 1
            scale_steps += 1
            last[0] = terms
            # One host sync a step, which L-BFGS makes anyway (it reads float(loss)): the stop rule reads
            # every step, whatever log_every says (it used to run at log points only).
            value = float(loss.detach())
            if not math.isfinite(value):
                raise PairError("nonfinite", f"the loss became {value} at step {steps_done}; "
                                "try lower weights, optimizer adam or precision fp32")
            history.append(value)
            if scale_steps % cfg.log_every == 0:
                log(terms)
            if converged(history, cfg.stop_window, cfg.stop_tolerance):
                raise _Stop
            return seen

        try:
            if cfg.optimizer == "lbfgs":
                # A strong-Wolfe line search, on the loss divided by the scale's first loss. The tutorial's
                # L-BFGS (no line search, lr 1) jumps to a far worse point when the objective is badly scaled
                # (its own weights on Caffe-scaled features: 1e13 at the start) and never comes back, and the
                # line search's cubic interpolation overflows float32 on losses that large; normalised, it
                # works for every objective (measured: docs/benchmarks.md, "Recovery").
                # The closure ends the scale when its budget is spent or the stop rule fires, so L-BFGS's own
                # limits stay above the budget, and tolerance_grad is off: on a normalised loss its absolute
                # 1e-7 could stop a large image early.
                opt = torch.optim.LBFGS([x], lr=1.0, max_iter=cfg.steps + 1, max_eval=cfg.steps + 1,
                                        tolerance_grad=0.0, history_size=100, line_search_fn="strong_wolfe")
                opt.step(closure)
            else:
                opt = torch.optim.Adam([x], lr=cfg.lr)
                while True:
                    closure()
                    opt.step()
                    with torch.no_grad():
                        x.clamp_(0, 1)
        except _Stop:
            pass
        x = best_x
        if (h, w) != shapes[-1] and scale_steps % cfg.log_every and last[0] is not None:
            log(last[0])  # a coarse scale's last step; the caller logs the final one itself

    assert x is not None
    with torch.no_grad():
        final_terms = evaluate(x)  # the best image of the last scale, already inside [0, 1]
    final = rows_of(final_terms, max(x.shape[-2:]))
    if not all(math.isfinite(r.total) for r in final):
        raise PairError("nonfinite", f"the final loss is {sum(r.total for r in final)}; "
                        "try lower weights or precision fp32")
    return Result(x.detach().float().cpu().contiguous(), final, steps_done, start_rows)


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
