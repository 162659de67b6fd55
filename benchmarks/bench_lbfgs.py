#!/usr/bin/env python
"""The batched, per-image L-BFGS (nst_batch/lbfgs.py) against today's optimize_scale (torch.optim.LBFGS,
strong-Wolfe, history 100), on the same objective and the same number of evaluations. By hand, from the
repository root:

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

from nst_batch import images, lbfgs, losses
from nst_batch.engine import Engine, to_tensor
from nst_batch.manifest import Settings
from nst_batch.optimize import OptimConfig, optimize_scale
from nst_batch.plan import file_hash
from nst_batch.vgg import resize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "images"


def objective(engine: Engine, content: torch.Tensor, style: Path, size: int):
    """fn(x) -> per-image totals (B,), and the LossTerms evaluate optimize_scale wants."""
    obj, net = engine.objective, engine.net
    with torch.no_grad():
        c_tgt = losses.content_targets(obj, net(content, frozenset(obj.content_layers)))
    s_tgt = engine.style_targets(style, file_hash(style), size)

    def terms(x: torch.Tensor) -> losses.LossTerms:
        return losses.compute(obj, net(x, obj.layers), x, c_tgt, s_tgt)
    return (lambda x: terms(x).total), terms


def run_old(content: torch.Tensor, terms, steps: int) -> list[float]:
    """Best-so-far summed loss after each evaluation of optimize_scale (torch LBFGS)."""
    cfg = OptimConfig(steps=steps, optimizer="lbfgs", lr=0.0, scales=(1.0,), init="content", seed=0, log_every=1,
                      stop_window=0, stop_tolerance=0.0, autocast_dtype=None, channels_last=False)
    seen: list[float] = []
    optimize_scale(content, terms, cfg, lambda t, step: seen.append(float(t.total.detach().sum())))
    best, out = float("inf"), []
    for v in seen:
        best = min(best, v) if v == v else best
        out.append(best)
    return out


def run_new(content: torch.Tensor, fn, steps: int, history: int) -> list[float]:
    """Best-so-far summed loss after each evaluation of lbfgs.minimize."""
    r = lbfgs.minimize(content, lbfgs.value_and_grad(fn), steps, history=history)
    per_eval = r.losses.sum(1).tolist()
    return torch.tensor(per_eval).cummin(0).values.tolist()


def at(curve: list[float], k: int) -> float:
    return curve[min(k, len(curve)) - 1] / curve[0]


def compare(a, settings: Settings) -> None:
    engine = Engine(settings)
    contents = images.discover(SHARED / "content")
    styles = images.discover(SHARED / "styles")
    pairs = [(contents[i % len(contents)], styles[(i + a.offset) % len(styles)]) for i in range(a.pairs)]
    marks = [k for k in (10, 25, 50, 100, 200) if k < a.steps] + [a.steps]
    print(f"layers {settings.layers}, {a.size} px, {a.steps} evaluations, history {a.history}, shrink {lbfgs.SHRINK}, "
          f"armijo {lbfgs.ARMIJO}; normalised best loss at evaluation " + ", ".join(map(str, marks)))
    ratios = []
    for c, s in pairs:
        x0 = to_tensor(images.load_rgb(c), a.size).contiguous()
        fn, terms = objective(engine, x0, s, a.size)
        name = f"{s.stem[:18]} x {c.stem[:18]}"
        t0 = time.perf_counter()
        new = run_new(x0, fn, a.steps, a.history)
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
    """B same-shape photos (crops of the shared photos, resized alike) with one style: one batch vs one by one."""
    engine = Engine(settings)
    contents = images.discover(SHARED / "content")
    style = images.discover(SHARED / "styles")[a.offset]
    h, w = a.size * 3 // 4, a.size
    crops = []
    for i in range(a.batch):
        full = to_tensor(images.load_rgb(contents[i % len(contents)]), 2 * a.size)
        H, W = full.shape[-2:]
        ch, cw = min(H, W * 3 // 4), min(W, H * 4 // 3)  # a 4:3 crop, left or right
        left = 0 if i // len(contents) % 2 == 0 else W - cw
        crops.append(resize(full[..., (H - ch) // 2:(H - ch) // 2 + ch, left:left + cw], h, w).clamp(0, 1))
    x0 = torch.cat(crops).contiguous()
    fn, _ = objective(engine, x0, style, a.size)
    ev = lbfgs.value_and_grad(fn)
    t0 = time.perf_counter()
    together = lbfgs.minimize(x0, ev, a.steps, history=a.history)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [lbfgs.minimize(x0[i:i + 1], lbfgs.value_and_grad(objective(engine, x0[i:i + 1], style, a.size)[0]),
                            a.steps, history=a.history) for i in range(a.batch)]
    t_solo = time.perf_counter() - t0
    diff = [(together.images[i] - alone[i].images[0]).abs().max().item() * 255 for i in range(a.batch)]
    fin = [float(together.losses[:, i].min() / together.losses[0, i]) for i in range(a.batch)]
    print(f"{a.batch} photos {w}x{h}, {style.stem}, {a.steps} evaluations: batch {t_batch:.1f} s, one by one "
          f"{t_solo:.1f} s, batch/solo {t_batch / t_solo:.2f}")
    print("max |batch - solo| per image, in 1/255: " + " ".join(f"{d:.3g}" for d in diff))
    print("normalised final loss per image: " + " ".join(f"{v:.3f}" for v in fin))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--offset", type=int, default=0, help="pair i is content i x style i + offset")
    ap.add_argument("--recovery", action="store_true", help="layers tutorial (weights 1 / 1e6, Caffe VGG)")
    ap.add_argument("--batch", type=int, default=0, help="B photos in one batch vs one by one")
    ap.add_argument("--new-only", action="store_true")
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
    if a.batch:
        batch(a, settings)
    else:
        compare(a, settings)


if __name__ == "__main__":
    main()
