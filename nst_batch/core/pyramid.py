"""Coarse to fine: the pyramid of sizes one output is optimised at (`stylize`), each scale by
`optimize.optimize_scale`.

With `scales = (0.5, 1.0)` the image is first optimised at half size, then upsampled and refined
at full size. Each scale runs `steps` steps; a half-size step costs about a quarter of a full
one, and the full-size steps start close to the answer.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable

import torch

from . import losses
from ..errors import PairError
from ..config.objective import MIN_SIDE
from .losses import Targets
from ..config.objective import Objective
from .optimize import ChunkRunner, LogRow, OptimConfig, Result, Values, optimize_scale, values_of
from .vgg import VGGFeatures, resize


# The long side of the coarsest level that `scales: auto` aims for. VGG19's deepest style layer
# (relu5_1) sees 156 px of the image (relu4_2, the content layer, 84 px): at 256-512 px a style's
# strokes are laid out across the whole picture; at 2048 px without coarser levels they would be
# placed 1/8 as far apart, as small repeated texture. Each level then doubles to full size, as
# jcjohnson/neural-style's multires recipe does by hand (256 -> 512 -> 1024 -> 2048 -> 3620).
COARSEST = 256


def auto_scales(size: int) -> tuple[float, ...]:
    """What `scales: auto` means for an output of long side `size`: halvings of `size` down to the last
    one of at least COARSEST px (so the coarsest level is 256-511 px), and always one halving below 512 px
    (what the defaults were measured with: 192 and 512 px give [0.5, 1.0], as before `auto`).
    1024 -> [0.25, 0.5, 1.0]; 2048 -> [0.125, 0.25, 0.5, 1.0]; 3072 -> [0.125, 0.25, 0.5, 1.0] (384 px first)."""
    k = 1
    while size >> (k + 1) >= COARSEST:
        k += 1
    return tuple(2.0 ** -i for i in range(k, 0, -1)) + (1.0,)


def scale_shapes(height: int, width: int, scales: tuple[float, ...]) -> list[tuple[int, int]]:
    """Working (H, W) per scale, dropping coarse scales too small for VGG19."""
    shapes = []
    for s in scales:
        h, w = max(1, round(height * s)), max(1, round(width * s))
        if (min(h, w) >= MIN_SIDE or s == 1.0) and (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def upsampled(prev: torch.Tensor, c_img: torch.Tensor, add_detail: bool) -> torch.Tensor:
    """A coarser scale's result as the next scale's start. Upsampling blurs, and the fine style layers then
    start far above where content init would put them: with `add_detail`, the content detail the coarser
    scale could not hold is put back (one Laplacian-pyramid level); measured, this is what makes
    coarse-to-fine pay off."""
    h, w = c_img.shape[-2:]
    start = resize(prev, h, w)
    if add_detail:
        start = start + c_img - resize(resize(c_img, *prev.shape[-2:]), h, w)
    return start.clamp(0, 1)


def stylize(net: VGGFeatures, obj: Objective, content: torch.Tensor,
            style_for: Callable[[int, int], Targets], cfg: OptimConfig,
            on_log: Callable[[list[LogRow]], None] | None = None, init: torch.Tensor | None = None,
            runner: ChunkRunner | None = None) -> Result:
    """Optimise a batch of B output images, each starting from its content image.

    `content` is (B, 3, H, W) in [0, 1] on the net's device; all B share one size.
    `style_for(h, w)` returns the style Targets for a working size (the caller caches them).
    `on_log` gets one LogRow per image every `log_every` steps and at the end of each coarse scale;
    the final losses come back in Result.final, and the losses of doing nothing (the starting image,
    measured at full size) in Result.start.
    `init` (B, 3, H, W): start from this image at full size instead (a network's output to refine): the
    coarser scales are skipped; doing nothing is still measured on the photo itself. `runner`: how
    L-BFGS's chunks run (optimize.optimize_scale)."""
    t0 = time.perf_counter()
    device = content.device
    amp = torch.autocast(device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype else nullcontext()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    steps_done, each = 0, []  # steps of the batch, and per image, over all scales
    x: torch.Tensor | None = None
    first: torch.Tensor | None = None  # the first scale's starting image
    start_rows: list[LogRow] = []
    H, W = content.shape[-2:]

    def rows_of(values: Values, px: int, step: int) -> list[LogRow]:
        return [LogRow(step, px, *v, el) for el in [time.perf_counter() - t0] for v in values]  # one time a call

    shapes = scale_shapes(H, W, cfg.scales)
    if init is not None:
        shapes = shapes[-1:]
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

        if init is not None:
            start = init.to(c_img.dtype).clamp(0, 1)
            first = c_img
        elif x is None:
            start = c_img if cfg.init == "content" else torch.rand(c_img.shape, generator=gen).to(device)
            first = start
        else:
            start = upsampled(x.detach(), c_img, cfg.init == "content")
        if (h, w) == shapes[-1]:
            # What doing nothing scores at full size: the photo itself (or the first noise, upsampled).
            # The engine compares the final loss with it, so an optimisation that went nowhere is never
            # recorded as a stylization. One forward pass, without gradients.
            assert first is not None
            with torch.no_grad():
                start_rows = rows_of(values_of(evaluate(c_img if cfg.init == "content" or init is not None
                                                        else resize(first, h, w))), px, steps_done)

        def log(values: Values, step: int, px: int = px) -> None:
            if on_log:
                on_log(rows_of(values, px, step))

        scale = optimize_scale(start, evaluate, cfg, log, steps_done, runner)
        steps_done += scale.steps
        each = [a + b for a, b in zip(each, scale.each)] if each else list(scale.each)
        x = scale.image
        if (h, w) != shapes[-1] and scale.steps % cfg.log_every and scale.last is not None:
            log(scale.last, steps_done)  # a coarse scale's last step; the caller logs the final one itself

    assert x is not None
    with torch.no_grad():
        final_terms = evaluate(x)  # the best image of the last scale, already inside [0, 1]
    final = rows_of(values_of(final_terms), max(x.shape[-2:]), steps_done)
    if not all(math.isfinite(r.total) for r in final):
        raise PairError("nonfinite", f"the final loss is {sum(r.total for r in final)}; "
                        "try lower weights or precision fp32")
    return Result(x.detach().float().cpu().contiguous(), final, steps_done, start_rows, each)
