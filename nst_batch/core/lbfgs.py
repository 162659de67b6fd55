"""A batched L-BFGS on images whose inner steps never wait for the host, each image on its own.

Every image of a batch has its own step length, its own curvature history and its own stop rule, so
its result does not depend on its batch companions (torch.optim.LBFGS on the batch's summed loss
shares one line search and one history between them). Each iteration makes exactly one evaluation:
a trial point x + t·d, projected onto the box [0, 1], accepted per image by the Armijo condition
(masks, torch.where): accepted images move and update their history, rejected ones keep x and
shrink t. `run_chunk` makes n iterations without reading anything on the host, so a GPU is never
starved, and its State is tensors of static shapes updated in place (CUDA-graph friendly).

Torch and the standard library only: this module knows nothing of VGG or of the rest of nst_batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# The first step, as the mean change of a pixel value: a bf16 forward pass cannot see moves much
# smaller than this (the image is cast to bf16 at the first conv), so the first trial must be visible.
FIRST_STEP = 0.01
# Curvature pairs kept per image. Measured at 128 px, 100 evaluations (benchmarks/lbfgs-results.md):
# m = 5, 10 and 20 end within 0.1% of each other on 2 gatys pairs and within 10% (at losses near 1e-3
# of the start) on 3 tutorial-weights pairs, and m = 10 already matches torch's LBFGS with 100 pairs on
# gatys. 10 is the usual choice; each pair costs 2·N floats an image (m = 10: 190 MB at 1024x768).
HISTORY = 10
# A rejected trial's step is multiplied by this. Measured as above: 0.25 and 0.5 end alike (gatys
# rejects almost no unit step); 0.5 wastes the least when the unit step was only slightly too long.
SHRINK = 0.5
# Armijo's sufficient-decrease constant: the usual 1e-4 (Nocedal & Wright). Measured as above: 0.1
# ends alike; a small one accepts every step that decreases the loss, which keeps the one evaluation.
ARMIJO = 1e-4
# A curvature pair is kept only when the cosine between s and y exceeds this: scale-free (it does
# not depend on the image size or the loss units), and it keeps the inverse-Hessian estimate positive definite.
CURVATURE_EPS = 1e-8


@dataclass
class State:
    """One batch's optimiser state: B images of N values each, flattened. All tensors, static shapes."""

    shape: tuple[int, ...]  # (B, C, H, W): what `evaluate` gets
    x: torch.Tensor  # (B, N) the current point of each image, inside [0, 1]
    f: torch.Tensor  # (B,) its loss over `unit`
    g: torch.Tensor  # (B, N) its gradient over `unit`
    d: torch.Tensor  # (B, N) the search direction
    t: torch.Tensor  # (B,) the step length along d (1 but after rejections)
    gamma: torch.Tensor  # (B,) initial inverse-Hessian scale s·y / y·y of the newest pair
    S: torch.Tensor  # (m, B, N) circular buffer of steps s
    Y: torch.Tensor  # (m, B, N) and of gradient changes y
    rho: torch.Tensor  # (m, B) 1 / s·y; 0 for a slot never filled: a no-op in the two-loop recursion
    head: torch.Tensor  # (B,) long: the slot the next pair of each image goes to
    unit: torch.Tensor  # (B,) each image's first loss: losses are normalised by it
    best_x: torch.Tensor  # (B, N) the best point seen (never a NaN)
    best_f: torch.Tensor  # (B,) its loss, unnormalised (inf: none finite yet)
    done: torch.Tensor  # (B,) bool: frozen, its x no longer moves (stop rule, or the caller's choice)
    steps: torch.Tensor  # (B,) long: evaluations each image took while not done (the first included)
    recent: torch.Tensor  # (window + 1, B) the last losses, for the stop rule, by iteration mod window + 1
    it: torch.Tensor  # (1,) long: iterations made (all images)


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Evaluate:
    """An `evaluate` from fn: x (B, C, H, W) -> per-image loss (B,). The loss is summed for backward:
    images are independent, so each image's gradient is that of its own loss."""
    def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            f = fn(x)
            (g,) = torch.autograd.grad(f.sum(), x)
        return f.detach().float(), g
    return evaluate


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _free(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d without the components that would push a value at a bound out of [0, 1] (they would be clamped
    to no move, and waste the step length on the others)."""
    return torch.where(((x <= 0) & (d < 0)) | ((x >= 1) & (d > 0)), 0.0, d)


def direction(st: State) -> torch.Tensor:
    """-H·g by the two-loop recursion over each image's own history, newest pair first. Slots with
    rho = 0 (unfilled, rejected) change nothing, so no image needs a branch of its own."""
    m, B = st.rho.shape
    rows = torch.arange(B, device=st.x.device)
    q = _free(st.g, st.x)  # the projected gradient: a value pinned at a bound takes no part
    order = [(st.head - 1 - k) % m for k in range(m)]  # newest first, per image
    alphas = []
    for idx in order:
        s, y, rho = st.S[idx, rows], st.Y[idx, rows], st.rho[idx, rows]
        a = rho * _dot(s, q)
        q = q - a[:, None] * y
        alphas.append(a)
    r = st.gamma[:, None] * q
    for idx, a in zip(reversed(order), reversed(alphas)):
        s, y, rho = st.S[idx, rows], st.Y[idx, rows], st.rho[idx, rows]
        r = r + s * (a - rho * _dot(y, r))[:, None]
    # A value at a bound takes the steepest-descent move instead: the history, mixing coordinates, can keep
    # pointing it outwards after its gradient has turned inwards, and it would then never leave the bound
    # (measured: a box-constrained quadratic stalled at 1.04x its minimum for 100 steps).
    at_bound = (st.x <= 0) | (st.x >= 1)
    d = _free(torch.where(at_bound, -st.gamma[:, None] * st.g, -r), st.x)
    # Not a descent direction (rounding, or a NaN that slipped in): steepest descent, history forgotten.
    bad = ~(_dot(d, st.g) < 0)
    st.rho.mul_(~bad)
    return torch.where(bad[:, None], _free(-st.gamma[:, None] * st.g, st.x), d)


def init_state(x0: torch.Tensor, evaluate: Evaluate, history: int = HISTORY, window: int = 0) -> State:
    """The state at x0 (B, C, H, W), clamped into [0, 1]: one evaluation. `window`: the stop rule's."""
    B = x0.shape[0]
    x = x0.detach().float().reshape(B, -1).clamp(0, 1).contiguous()
    f_raw, g_raw = evaluate(x.view(x0.shape))
    # Normalised by each image's own first loss: a tutorial-weights objective starts near 1e13, and
    # its gradient steps and curvature products in float32 then lose everything (measured: recovery).
    unit = torch.where(torch.isfinite(f_raw) & (f_raw > 0), f_raw, torch.ones_like(f_raw))
    g = g_raw.reshape(B, -1).float() / unit[:, None]
    # The first direction moves each value by FIRST_STEP on average: -gamma·g with gamma = 1% / mean|g|.
    gamma = FIRST_STEP / g.abs().mean(1).clamp_min(1e-30)
    zeros = x.new_zeros(history, *x.shape)
    finite = torch.isfinite(f_raw)
    st = State(tuple(x0.shape), x, f_raw / unit, g, torch.zeros_like(x), torch.ones(B, device=x.device), gamma,
               zeros, zeros.clone(), x.new_zeros(history, B), torch.zeros(B, dtype=torch.long, device=x.device),
               unit, x.clone(), torch.where(finite, f_raw, torch.inf), torch.zeros(B, dtype=torch.bool, device=x.device),
               torch.ones(B, dtype=torch.long, device=x.device), x.new_zeros(window + 1, B),
               torch.zeros(1, dtype=torch.long, device=x.device))
    st.recent[0] = f_raw
    st.d = direction(st)
    return st


def step(st: State, evaluate: Evaluate, window: int = 0, tolerance: float = 0.0) -> torch.Tensor:
    """One iteration, one evaluation, in place; no host read. Returns each image's current loss (B,),
    unnormalised. `window`, `tolerance`: the stop rule (0: never stop), as in the stop rule of
    optimize.converged applied to each image's own losses."""
    active = ~st.done
    xt = torch.where(active[:, None], (st.x + st.t[:, None] * st.d).clamp(0, 1), st.x)
    f_raw, g_raw = evaluate(xt.view(st.shape))
    with torch.no_grad():
        ft, gt = f_raw / st.unit, g_raw.reshape(st.x.shape).float() / st.unit[:, None]
        s = xt - st.x  # the step actually made, after the projection: what the curvature pair must use
        ok = active & torch.isfinite(ft) & torch.isfinite(gt).all(1)
        # Projected Armijo: the predicted decrease is that of the projected step; never accept a rise.
        accept = ok & (ft <= st.f + ARMIJO * _dot(st.g, s).clamp(max=0))
        better = active & (f_raw < st.best_f)  # NaN compares False: never kept
        st.best_f.copy_(torch.where(better, f_raw, st.best_f))
        st.best_x.copy_(torch.where(better[:, None], xt, st.best_x))

        y = gt - st.g
        sy, yy, ss = _dot(s, y), _dot(y, y), _dot(s, s)
        keep = accept & (sy > CURVATURE_EPS * (ss * yy).sqrt())
        rows = torch.arange(st.x.shape[0], device=st.x.device)
        st.S[st.head, rows] = torch.where(keep[:, None], s, st.S[st.head, rows])
        st.Y[st.head, rows] = torch.where(keep[:, None], y, st.Y[st.head, rows])
        st.rho[st.head, rows] = torch.where(keep, 1 / torch.where(keep, sy, 1.0), st.rho[st.head, rows])
        st.head.copy_(torch.where(keep, (st.head + 1) % st.rho.shape[0], st.head))
        st.gamma.copy_(torch.where(keep, sy / torch.where(keep, yy, 1.0), st.gamma))

        st.x.copy_(torch.where(accept[:, None], xt, st.x))
        st.f.copy_(torch.where(accept, ft, st.f))
        st.g.copy_(torch.where(accept[:, None], gt, st.g))
        st.t.copy_(torch.where(accept, 1.0, torch.where(active, st.t * SHRINK, st.t)))
        st.d.copy_(torch.where(accept[:, None], direction(st), st.d))

        loss = st.f * st.unit
        st.steps.add_(active.long())
        st.it.add_(1)
        if window:  # configuration, not data: the stop rule on the losses window + 1 iterations apart
            ring = window + 1
            st.recent.index_copy_(0, st.it % ring, loss[None])
            old = st.recent.index_select(0, (st.it + 1) % ring)[0]
            st.done.logical_or_((st.it >= window) & ((old - loss).abs() <= tolerance * old.abs()))
    return loss


def run_chunk(st: State, evaluate: Evaluate, n: int, out: torch.Tensor | None = None,
              window: int = 0, tolerance: float = 0.0) -> torch.Tensor:
    """n iterations with no host read; each image's loss after each one goes to `out` (n, B), on the
    device (preallocated by the caller, or here), which is returned."""
    out = st.x.new_empty(n, st.x.shape[0]) if out is None else out
    for i in range(n):
        out[i] = step(st, evaluate, window, tolerance)
    return out


@dataclass
class Minimized:
    images: torch.Tensor  # (B, C, H, W) the best point of each image, inside [0, 1]
    losses: torch.Tensor  # (evaluations, B) each image's loss after each evaluation (the first: at x0)
    steps: torch.Tensor  # (B,) evaluations each image took before it stopped
    evaluations: int  # evaluations of the batch made (the first included)


def minimize(x0: torch.Tensor, evaluate: Evaluate, steps: int, chunk: int = 10, stop_window: int = 0,
             stop_tolerance: float = 0.0, history: int = HISTORY) -> Minimized:
    """Minimise each image of x0 (B, C, H, W) over [0, 1] in at most `steps` evaluations (the first,
    at x0, included), reading the host once per chunk of `chunk` iterations: to end when every image
    has stopped. The stop rule (stop_window 0: never) and everything else is per image."""
    st = init_state(x0, evaluate, history, stop_window)
    record = st.x.new_empty(steps, st.x.shape[0])
    record[0] = st.f * st.unit
    made = 1
    while made < steps:
        n = min(chunk, steps - made)
        run_chunk(st, evaluate, n, record[made:made + n], stop_window, stop_tolerance)
        made += n
        if stop_window and bool(st.done.all()):  # the one host read of a chunk
            break
    return Minimized(st.best_x.view(st.shape), record[:made], st.steps, made)


def sync_checked(run: Callable) -> Callable:
    """`run` (run_chunk) with CUDA's sync debug mode at `error` while it runs: a host read inside a chunk
    then raises instead of silently stalling the card. Only around the chunk: torch.cuda.graph itself
    synchronises before a capture, on purpose. For the GPU check (gpu.sh, the CUDA test), not for runs."""
    def checked(*args, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return checked
