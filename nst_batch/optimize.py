"""Optimising the pixels of an output image (or a batch of them) against an Objective.

One *step* is one evaluation of the objective: a VGG forward pass plus the gradient with
respect to the pixels. That is what costs time, for L-BFGS (where one iteration can take
more than one evaluation) and for Adam alike, and it is what the seed tutorial counted.

Coarse to fine: with `scales = (0.5, 1.0)` the image is first optimised at half size, then
upsampled and refined at full size. Each scale runs `steps` steps; a half-size step costs
about a quarter of a full one, and the full-size steps start close to the answer.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
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


class _Stop(Exception):
    """Raised inside an L-BFGS closure to end a scale early (stopping rule)."""


def scale_shapes(height: int, width: int, scales: tuple[float, ...]) -> list[tuple[int, int]]:
    """Working (H, W) per scale, dropping coarse scales too small for VGG19."""
    shapes = []
    for s in scales:
        h, w = max(1, round(height * s)), max(1, round(width * s))
        if (min(h, w) >= MIN_SIDE or s == 1.0) and (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def stylize(net: VGGFeatures, obj: Objective, content: torch.Tensor,
            style_for: Callable[[int, int], Targets], cfg: OptimConfig,
            on_log: Callable[[list[LogRow]], None] | None = None) -> Result:
    """Optimise a batch of B output images, each starting from its content image.

    `content` is (B, 3, H, W) in [0, 1] on the net's device; all B share one size.
    `style_for(h, w)` returns the style Targets for a working size (the caller caches them).
    `on_log` gets one LogRow per image every `log_every` steps and at the end of each coarse scale;
    the final losses come back in Result.final.
    """
    t0 = time.perf_counter()
    device = content.device
    amp = torch.autocast(device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype else nullcontext()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    steps_done = 0
    x: torch.Tensor | None = None
    H, W = content.shape[-2:]

    shapes = scale_shapes(H, W, cfg.scales)
    for h, w in shapes:
        px = max(h, w)
        c_img = resize(content, h, w).contiguous(memory_format=fmt)
        with torch.no_grad(), amp:
            c_tgt = losses.content_targets(obj, net(c_img, frozenset(obj.content_layers)))
        s_tgt = style_for(h, w)
        if x is None:
            start = c_img if cfg.init == "content" else torch.rand(c_img.shape, generator=gen).to(device)
        else:
            prev = x.detach()
            start = resize(prev, h, w)
            if cfg.init == "content":
                # Upsampling blurs, and the fine style layers then start far above where content init
                # would put them. Put back the content detail the coarser scale could not hold (one
                # Laplacian-pyramid level): measured, this is what makes coarse-to-fine pay off.
                start = start + c_img - resize(resize(c_img, *prev.shape[-2:]), h, w)
            start = start.clamp(0, 1)
        # The optimised pixels keep the default layout: L-BFGS flattens their gradient with .view(-1),
        # which fails on a channels_last tensor. The net gets a channels_last copy instead (3 channels: cheap).
        x = start.clone().contiguous().requires_grad_(True)
        history: list[tuple[int, float]] = []  # (step, summed total) at log points, for the stopping rule
        scale_steps = 0
        last: list[losses.LossTerms | None] = [None]
        # The best image seen so far, per image of the batch: L-BFGS without a line search can jump to a
        # much worse point late in a scale (seen: a loss of 0.74 ending at 3.6), and the tutorial kept
        # whatever the last step gave. Tracked with torch.where, so no host-device sync is added.
        best_x = x.detach().clone()
        best_loss = torch.full((x.shape[0],), float("inf"), device=device)

        def evaluate() -> losses.LossTerms:
            with amp:
                feats = net(x.contiguous(memory_format=fmt), obj.layers)
            return losses.compute(obj, feats, x, c_tgt, s_tgt)

        def log(terms: losses.LossTerms, force: bool = False) -> None:
            if not force and scale_steps % cfg.log_every:
                return
            vals = torch.stack([terms.content, terms.style, terms.tv, terms.total], 1).detach().cpu()
            if not torch.isfinite(vals).all():
                raise PairError("nonfinite", f"the loss became {vals.sum().item()} at step {steps_done}; "
                                "try lower weights, optimizer adam or precision fp32")
            el = time.perf_counter() - t0
            rows = [LogRow(steps_done, px, *map(float, v), el) for v in vals]
            history.append((scale_steps, float(vals[:, 3].sum())))
            if on_log:
                on_log(rows)
            if cfg.stop_window and not force:
                old = [l for s, l in history if s <= scale_steps - cfg.stop_window]
                # abs(): L-BFGS without line search spikes early in a scale (the loss x2..x300 for a few
                # steps); a spike is not convergence, and stopping there would keep the spiked image.
                if old and abs(old[-1] - history[-1][1]) <= cfg.stop_tolerance * abs(old[-1]):
                    raise _Stop

        def closure() -> torch.Tensor:
            nonlocal steps_done, scale_steps
            with torch.no_grad():
                x.clamp_(0, 1)  # the tutorial's trick: keep L-BFGS inside the valid pixel range
            opt.zero_grad(set_to_none=True)
            terms = evaluate()
            loss = terms.total.sum()  # images in a batch are independent: summing keeps their gradients apart
            loss.backward()
            with torch.no_grad():
                tot = terms.total.detach().float()
                better = tot < best_loss  # NaN compares False: a broken step is never kept
                best_loss.copy_(torch.where(better, tot, best_loss))
                best_x.copy_(torch.where(better.view(-1, 1, 1, 1), x.detach(), best_x))
            steps_done += 1
            scale_steps += 1
            last[0] = terms
            log(terms)
            return loss

        try:
            if cfg.optimizer == "lbfgs":
                # max_iter one above max_eval: the loop ends right after an evaluation, not on an
                # update that was never measured.
                opt = torch.optim.LBFGS([x], lr=1.0, max_iter=cfg.steps + 1, max_eval=cfg.steps,
                                        history_size=100, line_search_fn=None)
                opt.step(closure)
            else:
                opt = torch.optim.Adam([x], lr=cfg.lr)
                for _ in range(cfg.steps):
                    closure()
                    opt.step()
                    with torch.no_grad():
                        x.clamp_(0, 1)
        except _Stop:
            pass
        x = best_x
        if (h, w) != shapes[-1] and scale_steps % cfg.log_every and last[0] is not None:
            log(last[0], force=True)  # a coarse scale's last step; the caller logs the final one itself

    assert x is not None
    with torch.no_grad():
        final_terms = evaluate()  # the best image of the last scale, already inside [0, 1]
    vals = torch.stack([final_terms.content, final_terms.style, final_terms.tv, final_terms.total], 1).cpu()
    if not torch.isfinite(vals).all():
        raise PairError("nonfinite", f"the final loss is {vals.sum().item()}; try lower weights or precision fp32")
    el = time.perf_counter() - t0
    final = [LogRow(steps_done, max(x.shape[-2:]), *map(float, v), el) for v in vals]
    return Result(x.detach().float().cpu().contiguous(), final, steps_done)
