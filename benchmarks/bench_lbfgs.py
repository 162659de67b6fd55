#!/usr/bin/env python
"""The engine's L-BFGS (optimize.optimize_scale on core/lbfgs.py: per image, one evaluation an iteration,
history 10) against the previous one (torch.optim.LBFGS, strong-Wolfe, history 100, on the loss over its
first value and on x / k, as optimize.py ran it before ENGINE_VERSION 4; reproduced here as `run_old`), on
the same objective and the same number of evaluations. By hand, from the repository root:

    python3 -m benchmarks.bench_lbfgs --size 128 --steps 100 --pairs 5           # loss per evaluation
    python3 -m benchmarks.bench_lbfgs --recovery                                  # tutorial preset weights
    python3 -m benchmarks.bench_lbfgs --batch 8 --steps 50                        # 8 in one batch vs one by one
    python3 -m benchmarks.bench_lbfgs --pairs 3 --new-only --history 5 --shrink 0.25   # tuning

Pairs are content i x style (i + k) of ../shared/images, one scale, VGG19 caffe weights, fp32, CPU.
Losses are normalised by the photo's own loss (the first evaluation): 1.0 means no progress. Each
run keeps its best image, so "final" is the best loss seen in the budget.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from nst_batch.config.manifest import Settings
from nst_batch.core import lbfgs, losses
from nst_batch.core.engine import Engine
from nst_batch.core.optimize import OptimConfig, optimize_scale
from nst_batch.core.vgg import resize
from nst_batch.files.decode import discover, load_rgb, to_tensor
from nst_batch.files.hashing import file_hash
from nst_batch.run.jobs import file_engine, file_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "images"


def objective(engine: Engine, content: torch.Tensor, style: Path, size: int):
    """The LossTerms evaluate optimize_scale wants, for these photos and this style."""
    obj, net = engine.objective, engine.net
    with torch.no_grad():
        c_tgt = losses.content_targets(obj, net(content, frozenset(obj.content_layers)))
    key = file_hash(style)
    engine.style_pixels.add(key, style)
    s_tgt = engine.style_targets(key, size)

    def terms(x: torch.Tensor) -> losses.LossTerms:
        return losses.compute(obj, net(x, obj.layers), x, c_tgt, s_tgt)
    return terms


def _best_so_far(seen: list[float]) -> list[float]:
    best, out = float("inf"), []
    for v in seen:
        best = min(best, v) if v == v else best
        out.append(best)
    return out


def run_old(content: torch.Tensor, terms, steps: int) -> list[float]:
    """Best-so-far summed loss after each evaluation of the previous optimiser: torch.optim.LBFGS (history
    100, strong Wolfe) on v = x / k (its first step then moves a value by 1%), on the loss over its first
    value, clamped into the box before each evaluation, as optimize.py ran it for ENGINE_VERSION 3."""
    k = 0.01 * content.numel()
    v = content.div(k).contiguous().requires_grad_(True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=steps + 1, max_eval=steps + 1, tolerance_grad=0.0,
                            history_size=100, line_search_fn="strong_wolfe")
    seen: list[float] = []
    unit: list[float] = []

    class Done(Exception):
        pass

    def closure():
        if len(seen) >= steps:
            raise Done
        with torch.no_grad():
            v.clamp_(0, 1 / k)
        opt.zero_grad(set_to_none=True)
        loss = terms(v * k).total.sum()
        seen.append(float(loss.detach()))
        unit.append(unit[0] if unit else (seen[0] if seen[0] > 0 else 1.0))
        scaled = loss / unit[0]
        scaled.backward()
        return scaled

    try:
        opt.step(closure)
    except Done:
        pass
    return _best_so_far(seen)


def run_new(content: torch.Tensor, terms, steps: int, history: int) -> list[float]:
    """Best-so-far summed loss after each evaluation of optimize_scale (the engine's L-BFGS)."""
    cfg = OptimConfig(steps=steps, optimizer="lbfgs", lr=0.0, scales=(1.0,), init="content", seed=0, log_every=1,
                      stop_window=0, stop_tolerance=0.0, autocast_dtype=None, channels_last=False)
    seen: list[float] = []
    keep = lbfgs.HISTORY
    lbfgs.HISTORY = history  # optimize_scale allocates min(HISTORY, steps - 1) pairs
    try:
        optimize_scale(content, terms, cfg, lambda values, step: seen.append(sum(v[3] for v in values)))
    finally:
        lbfgs.HISTORY = keep
    return _best_so_far(seen)


def at(curve: list[float], k: int) -> float:
    return curve[min(k, len(curve)) - 1] / curve[0]


def compare(a, settings: Settings) -> None:
    engine = file_engine(settings)
    contents = discover(SHARED / "content")
    styles = discover(SHARED / "styles")
    pairs = [(contents[i % len(contents)], styles[(i + a.offset) % len(styles)]) for i in range(a.pairs)]
    marks = [k for k in (10, 25, 50, 100, 200) if k < a.steps] + [a.steps]
    print(f"layers {settings.layers}, {a.size} px, {a.steps} evaluations, history {a.history}, shrink {lbfgs.SHRINK}, "
          f"armijo {lbfgs.ARMIJO}; normalised best loss at evaluation " + ", ".join(map(str, marks)))
    ratios = []
    for c, s in pairs:
        x0 = to_tensor(load_rgb(c), a.size).contiguous()
        terms = objective(engine, x0, s, a.size)
        name = f"{s.stem[:18]} x {c.stem[:18]}"
        t0 = time.perf_counter()
        new = run_new(x0, terms, a.steps, a.history)
        t_new = time.perf_counter() - t0
        line = f"{name:<40} new " + " ".join(f"{at(new, k):.4f}" for k in marks) + f" ({t_new:.0f} s)"
        if not a.new_only:
            t0 = time.perf_counter()
            old = run_old(x0, terms, a.steps)
            t_old = time.perf_counter() - t0
            ratio = new[-1] / old[-1]
            ratios.append(ratio)
            line += "  old " + " ".join(f"{at(old, k):.4f}" for k in marks) + f" ({t_old:.0f} s)  new/old {ratio:.3f}"
        print(line, flush=True)
    if ratios:
        print(f"median new/old final loss: {statistics.median(ratios):.3f} over {len(ratios)} pairs")


def batch(a, settings: Settings) -> None:
    """B same-shape photos (4:3 crops of the shared photos, resized alike) with one style, through Engine.make:
    one batch of B (batch: B) vs one by one (batch: 1). Wall ratio, and how far each image moved."""
    contents = discover(SHARED / "content")
    style = discover(SHARED / "styles")[a.offset]
    h, w = a.size * 3 // 4, a.size
    crops = []
    for i in range(a.batch):
        full = to_tensor(load_rgb(contents[i % len(contents)]), 2 * a.size)
        H, W = full.shape[-2:]
        ch, cw = min(H, W * 3 // 4), min(W, H * 4 // 3)  # a 4:3 crop, left or right
        left = 0 if i // len(contents) % 2 == 0 else W - cw
        crops.append(resize(full[..., (H - ch) // 2:(H - ch) // 2 + ch, left:left + cw], h, w).clamp(0, 1))
    s = settings.replace(scales=(1.0,), stop_window=0, log_every=a.steps)
    made, secs = {}, {}
    for n in (a.batch, 1):
        engine = file_engine(s.replace(batch=n))
        jobs = [file_job(engine, Path(f"crop{i}"), style, content=f"crop{i}", photo=c) for i, c in enumerate(crops)]
        t0 = time.perf_counter()
        made[n] = engine.make(jobs)
        secs[n] = time.perf_counter() - t0
    diff = [float((x.image - y.image).abs().max()) * 255 for x, y in zip(made[a.batch], made[1])]
    fin = [m.final.total / m.start.total for m in made[a.batch]]
    print(f"{a.batch} photos {w}x{h}, {style.stem}, {a.steps} evaluations, Engine.make: batch {secs[a.batch]:.1f} s, "
          f"one by one {secs[1]:.1f} s, batch/solo {secs[a.batch] / secs[1]:.2f}")
    print("max |batch - solo| per image, in 1/255: " + " ".join(f"{d:.3g}" for d in diff))
    print("final / start loss per image: " + " ".join(f"{v:.3f}" for v in fin))


def host_reads(a, settings: Settings) -> None:
    """Host reads (Tensor.item, __float__, __bool__, tolist, cpu, numpy, __int__) per evaluation over one whole
    Engine.make of pair 0, with the run's scales (auto) and log_every: each would make a GPU wait."""
    contents, styles = discover(SHARED / "content"), discover(SHARED / "styles")
    engine = file_engine(settings)
    job = file_job(engine, contents[0], styles[a.offset])
    evaluations = [0]
    net = engine.net

    def counting(x, wanted):
        evaluations[0] += int(torch.is_grad_enabled() and x.requires_grad)
        return net(x, wanted)
    engine.net = counting
    count = [0]
    saved = {}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy"):
        saved[name] = orig = getattr(torch.Tensor, name)

        def counted(*args, _orig=orig, **kw):
            count[0] += 1
            return _orig(*args, **kw)
        setattr(torch.Tensor, name, counted)
    try:
        (m,) = engine.make([job])
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
    print(f"{job.style[:18]} x {job.content[:18]}, {a.size} px, scales {engine.settings.scales}, {a.steps} steps a "
          f"scale, log_every {settings.log_every}: {evaluations[0]} evaluations, {count[0]} host reads, "
          f"{count[0] / evaluations[0]:.3f} per evaluation; final/start {m.final.total / m.start.total:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--offset", type=int, default=0, help="pair i is content i x style i + offset")
    ap.add_argument("--recovery", action="store_true", help="layers tutorial (weights 1 / 1e6, Caffe VGG)")
    ap.add_argument("--batch", type=int, default=0, help="B photos in one batch vs one by one")
    ap.add_argument("--new-only", action="store_true")
    ap.add_argument("--host-reads", action="store_true", help="host reads per evaluation over one Engine.make")
    ap.add_argument("--history", type=int, default=lbfgs.HISTORY)
    ap.add_argument("--shrink", type=float, default=lbfgs.SHRINK)
    ap.add_argument("--armijo", type=float, default=lbfgs.ARMIJO)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lbfgs.SHRINK, lbfgs.ARMIJO = a.shrink, a.armijo
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    settings = Settings(content=SHARED / "content", styles=SHARED / "styles", out=Path("/tmp/nst-bench-lbfgs"),
                        size=a.size, steps=a.steps, layers="tutorial" if a.recovery else "gatys", device="cpu")
    if a.host_reads:
        host_reads(a, settings.replace(scales="auto", log_every=10))
    elif a.batch:
        batch(a, settings)
    else:
        compare(a, settings)


if __name__ == "__main__":
    main()
