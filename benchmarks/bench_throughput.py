#!/usr/bin/env python
"""Throughput: the seed tutorial's loop vs nst-batch, on the same pairs, in one process.

    python benchmarks/bench_throughput.py --size 128 --pairs 2x2          # from the repository root

For each of the first N contents x M styles of ../shared/images (or --images DIR with
content/ and styles/), at one size (long side, aspect kept), it runs:
- `loop`: the tutorial loop, re-implemented faithfully in benchmarks/tutorial_loop.py
  (per pair: deep copy of VGG, model rebuilt with loss modules, L-BFGS 16 x 20 = 320 evaluations);
- each `--config`: nst-batch (pyramid.stylize with the Engine's net, objective and OptimConfig,
  built from Settings exactly as the CLI would), by default on the `tutorial` layer preset;
- `default`: nst-batch with its own defaults (gatys preset), unless --no-default-row.
Within a pair the order alternates (loop first, then loop last) so both see similar load.

Every image is judged by ONE evaluator (TutorialEvaluator): the tutorial preset's loss (VGG19
caffe weights, conv_4 content, conv_1..conv_5 style, Gram / (C*H*W), weights 1 and 1e6) of the
final clamped image at full size, in fp32. The style is resized to the content's exact H x W,
as the tutorial requires of its user, and nst-batch gets style targets from the same resized
style at every scale (so "the same style size" holds for every row, the default row included).

"reach" is the time nst-batch took to FIRST log a loss at or below the loop's final loss.
Only steps at full size count (a coarse scale's loss is of a smaller image: not comparable).
Those logged losses are the evaluator's own number only when the run optimises the tutorial
objective in fp32 (checked on the final image: `log/eval` column); with bf16 they are the
bf16-forward loss, and the column says how far that is from the evaluator at the end. A run
logs every step (log_every=1) for this; that costs one 4-number device->host copy per step.

Peak memory is per run: RSS high-water mark (reset through /proc/self/clear_refs where the
kernel allows, else resource.getrusage's process-lifetime peak, marked '*'), and on CUDA
torch.cuda.max_memory_allocated.

Extras: --batch (B=2 contents of one size in one stylize call vs two calls, Adam and L-BFGS),
--profile (torch.profiler over one nst-batch pair), --memory-sizes 512,1024,2048 (peak memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tutorial_loop, next to this file

from nst_batch.files import decode# noqa: E402
from nst_batch.core import losses
from nst_batch.config import manifest
from nst_batch.core.engine import Engine, pick_device, resolve  # noqa: E402
from nst_batch.files.decode import to_tensor  # noqa: E402
from nst_batch.core.optimize import LogRow, OptimConfig, Result  # noqa: E402
from nst_batch.core.pyramid import scale_shapes, stylize  # noqa: E402
from nst_batch.config.objective import PRESETS  # noqa: E402
from nst_batch.core.vgg import VGGFeatures, flops_per_step, load_vgg19  # noqa: E402
from tutorial_loop import Normalization, caffe_vgg19_features, run_style_transfer  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "images"
TUTORIAL = PRESETS["tutorial"]

# Chosen from the measurements in docs/benchmarks.md; any Settings key can be set, values are YAML.
DEFAULT_CONFIGS = [
    # Each names its scales and stop rule: the Settings defaults move, these rows must not.
    "single:layers=tutorial;steps=300;scales=[1.0];stop_window=0",  # like for like (the loop makes 320)
    "c2f:layers=tutorial;scales=[0.5,1.0];steps=250;stop_window=0",  # coarse to fine, 250 steps per scale
    "c2f-short:layers=tutorial;scales=[0.5,1.0];steps=150;stop_window=0",
]


# -- inputs ---------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    content_path: Path
    style_path: Path
    content: torch.Tensor  # (1, 3, H, W) in [0, 1], contiguous, on the device
    style_im: Image.Image  # decoded original, resized on demand

    @property
    def name(self) -> str:
        return f"{self.style_path.stem} x {self.content_path.stem}"

    @property
    def hw(self) -> tuple[int, int]:
        return self.content.shape[-2], self.content.shape[-1]

    def style_at(self, h: int, w: int) -> torch.Tensor:
        """The style resized to exactly h x w (aspect not kept), as the tutorial's user must do."""
        im = self.style_im.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).unsqueeze(0)
        return t.float().div_(255.0).contiguous().to(self.content.device)


def load_pairs(root: Path, n_content: int, n_style: int, size: int, device: torch.device) -> list[Pair]:
    contents = decode.discover(root / "content")[:n_content]
    styles = decode.discover(root / "styles")[:n_style]
    if len(contents) < n_content or len(styles) < n_style:
        raise SystemExit(f"{root} has {len(contents)} content and {len(styles)} style images; "
                         f"--pairs {n_content}x{n_style} needs more")
    out = []
    for s in styles:
        style_im = decode.load_rgb(s)
        for c in contents:
            # .contiguous(): to_tensor returns a permuted (channels-last-strided) view; the tutorial's
            # ToTensor gives a contiguous tensor, and L-BFGS needs one.
            t = to_tensor(decode.load_rgb(c), size).contiguous().to(device)
            out.append(Pair(c, s, t, style_im))
    return out


# -- the one yardstick ------------------------------------------------------------------------------------------


class TutorialEvaluator:
    """The tutorial preset's total loss of an image at the pair's full size, in fp32, after clamping to [0, 1]."""

    def __init__(self, net: VGGFeatures, pair: Pair):
        self.net = net
        with torch.no_grad():
            self.content = losses.content_targets(TUTORIAL, net(pair.content, frozenset(TUTORIAL.content_layers)))
            self.style = losses.style_targets(TUTORIAL, net(pair.style_at(*pair.hw), frozenset(TUTORIAL.style_layers)))

    def __call__(self, img: torch.Tensor) -> float:
        with torch.no_grad():
            x = img.to(self.net.mean.device, torch.float32).clamp(0, 1).contiguous()
            return float(losses.compute(TUTORIAL, self.net(x, TUTORIAL.layers), x, self.content, self.style).total[0])


# -- measuring ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak host RSS and CUDA allocation over a block, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_mb = 0.0  # high-water mark of the whole process
        self.rss_delta_mb = 0.0  # ...minus the RSS on entry: what the block itself needed (weights etc. excluded)
        self.cuda_mb: float | None = None
        self.rss_is_lifetime = False

    def __enter__(self) -> "PeakMemory":
        self._start = _status_mb("VmRSS:")
        try:  # '5' resets this process's RSS high-water mark (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.rss_is_lifetime = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        hwm = None if self.rss_is_lifetime else _status_mb("VmHWM:")
        self.rss_mb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.rss_is_lifetime = hwm is None
        self.rss_delta_mb = self.rss_mb - (self._start or 0.0)
        if self.device.type == "cuda":
            self.cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


@dataclass
class Run:
    method: str
    pair: str
    seconds: float
    cpu_seconds: float
    loss: float  # the evaluator's
    steps: int  # evaluations of the objective (with gradient)
    flops: float  # useful FLOPs (VGG forward + input gradient), vggs.flops_per_step per evaluation
    rss_mb: float  # process peak
    rss_delta_mb: float  # peak minus RSS at the start of the run
    cuda_mb: float | None
    reach_s: float | None = None  # first full-size step at or below the loop's final loss
    log_vs_eval: float | None = None  # nst-batch's own final loss / the evaluator's - 1
    note: str = ""


def run_loop(pair: Pair, cnn: torch.nn.Module, norm: Normalization, ev: TutorialEvaluator, num_steps: int,
             freeze: bool, device: torch.device) -> Run:
    style = pair.style_at(*pair.hw)  # decoding and resizing are outside the timing, for both sides
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the tutorial leaves alone
    with PeakMemory(device) as mem:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out, info = run_style_transfer(cnn, norm, pair.content, style, num_steps=num_steps, freeze_vgg=freeze)
        _sync(device)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    loss = ev(out)
    check = info["first_loss"] / ev(pair.content) - 1  # the loop's own loss at content init vs the evaluator's
    note = "" if abs(check) < 1e-4 else f"loop/evaluator at init differ by {check:+.2e}"
    flops = info["evals"] * flops_per_step(*pair.hw, TUTORIAL.last_layer)
    return Run("loop-frozen" if freeze else "loop", pair.name, secs, cpu, loss, info["evals"], flops,
               mem.rss_mb, mem.rss_delta_mb, mem.cuda_mb, note=note)


@dataclass
class NstConfig:
    name: str
    settings: manifest.Settings
    engine: Engine = field(repr=False)
    optim: OptimConfig  # the engine's, or a variant a measurement asks for (fewer steps): a value, not a patch
    cudnn_benchmark: bool = True  # what Engine sets on CUDA; a config may turn it off to measure it


# Not Settings keys (Engine decides them from the device): the benchmark overrides them to measure each.
BENCH_KEYS = ("channels_last", "cudnn_benchmark")


def make_config(spec: str, device: torch.device, base_layers: Any = "tutorial") -> NstConfig:
    """'name:key=value;key=value' -> Settings checked by the manifest code, and an Engine built from them."""
    name, _, rest = spec.partition(":")
    items = [kv for kv in rest.split(";") if kv.strip()]
    changes = manifest.parse_set(items)
    extra = {k: bool(changes.pop(k)) for k in BENCH_KEYS if k in changes}
    changes.setdefault("layers", base_layers)
    s = manifest.apply(manifest.Settings(), changes, f"--config {name}")
    s = s.replace(device=str(device), log_every=1)  # log every step: the reach time needs the trajectory
    config = resolve(s, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    if "channels_last" in extra:  # the engine lays its net out as its config says
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, channels_last=extra["channels_last"]))
    engine = Engine(s, device, config)
    return NstConfig(name, s, engine, engine.optim, cudnn_benchmark=extra.get("cudnn_benchmark", True))


def run_nst(cfg: NstConfig, pair: Pair, ev: TutorialEvaluator, device: torch.device,
            content: torch.Tensor | None = None) -> tuple[Run, Result, list[LogRow]]:
    engine = cfg.engine
    obj = engine.objective
    content = pair.content if content is None else content
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and device.type == "cuda"
    rows: list[LogRow] = []
    with PeakMemory(device) as mem:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = stylize(engine.net, obj, content, lambda h, w: _targets(engine, pair, h, w, device), cfg.optim,
                      on_log=lambda r: rows.append(r[0]), runner=engine.chunks)
        _sync(device)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    loss = ev(res.images[:1])
    H, W = content.shape[-2:]
    shapes = {max(h, w): (h, w) for h, w in scale_shapes(H, W, cfg.optim.scales)}
    flops = sum(flops_per_step(*shapes[r.px], obj.last_layer) for r in rows) * content.shape[0]
    run = Run(cfg.name, pair.name, secs, cpu, loss, res.steps, flops, mem.rss_mb, mem.rss_delta_mb, mem.cuda_mb)
    if obj == TUTORIAL:
        run.log_vs_eval = res.final[0].total / loss - 1
        if cfg.optim.autocast_dtype is not None:
            run.note = "reach from bf16-forward losses"
    else:
        run.note = f"optimises the {engine.settings.layers} objective; loss is the tutorial evaluator's"
    return run, res, rows


def reach_time(run: Run, res: Result, rows: list[LogRow], full_px: int, loop_loss: float) -> float | None:
    """Seconds to the first full-size step whose logged loss is at or below the loop's final loss.

    Coarse-scale steps never count: their loss is of a smaller image. None when never reached,
    or when the run's own losses are not the tutorial objective's.
    """
    if run.log_vs_eval is None:
        return None
    hit = next((r for r in rows if r.px == full_px and r.total <= loop_loss), None)
    if hit is None and res.final[0].total <= loop_loss:
        hit = res.final[0]
    return hit.elapsed_s if hit else None


# -- reporting ------------------------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_run(r: Run, loop: Run | None) -> None:
    rel = f"{r.loss / loop.loss:6.3f}" if loop and r is not loop else "     -"
    reach = fmt_s(r.reach_s) if r.method not in ("loop", "loop-frozen") else "-"
    lve = "-" if r.log_vs_eval is None else f"{r.log_vs_eval:+.1e}"
    mem = f"RSS {r.rss_mb:.0f} (+{r.rss_delta_mb:.0f})" + (f" CUDA {r.cuda_mb:.0f}" if r.cuda_mb is not None else "")
    print(f"  {r.method:<14} {r.seconds:7.1f} s  cpu {r.cpu_seconds:7.1f} s  loss {r.loss:10.4g}  x loop {rel}  "
          f"reach {reach:>6} s  steps {r.steps:4d}  {r.flops / r.seconds / 1e12:6.3f} TFLOP/s  "
          f"log/eval {lve:>8}  {mem} MiB  {r.note}", flush=True)


def summarize(runs: list[Run], pairs: list[str], target: float, peaks: dict[str, str] | None = None,
              card: dict[str, float] | None = None) -> list[dict]:
    """Per method: pairs/hour, ratio to the loop, loss vs loop, and the target verdict.

    `peaks` maps a method to the card peak it is judged against ('bf16' or 'tf32'), `card` holds them.
    """
    loop = {r.pair: r for r in runs if r.method == "loop"}
    methods = list(dict.fromkeys(r.method for r in runs))
    out = []
    print(f"\nSummary over {len(pairs)} pair(s); ratio = loop seconds / method seconds (summed over pairs)")
    print(f"  {'method':<14} {'s/pair':>7} {'pairs/h':>8} {'ratio':>6} {'loss/loop':>9} {'<=loop':>6} "
          f"{'reach ratio':>11} {'worst pair':>10}  target (>= {target:g}x, loss <= loop)")
    for m in methods:
        rs = [r for r in runs if r.method == m]
        secs = sum(r.seconds for r in rs)
        row: dict[str, Any] = {"method": m, "pairs": len(rs), "s_per_pair": secs / len(rs),
                               "pairs_per_hour": 3600 * len(rs) / secs}
        have_loop = all(r.pair in loop for r in rs) and m != "loop"
        verdict = ""
        if have_loop:
            lsecs = sum(loop[r.pair].seconds for r in rs)
            row["ratio"] = lsecs / secs
            row["loss_over_loop_geomean"] = math.exp(statistics.fmean(math.log(r.loss / loop[r.pair].loss) for r in rs))
            row["pairs_at_or_below_loop"] = sum(r.loss <= loop[r.pair].loss for r in rs)
            reached = [r for r in rs if r.reach_s is not None]
            row["reach_ratio"] = (lsecs / sum(r.reach_s for r in rs)) if len(reached) == len(rs) else None
            worst = min(loop[r.pair].seconds / r.seconds for r in rs)
            row["worst_pair_ratio"] = worst
            ok = row["pairs_at_or_below_loop"] == len(rs) and worst >= target
            verdict = "MET" if ok else (
                f"not met: {worst:.2f}x worst pair, {row['pairs_at_or_below_loop']}/{len(rs)} pairs at or below the "
                f"loop's loss")
            if row["reach_ratio"] is not None:
                verdict += f"; stopping at the loop's loss would give {row['reach_ratio']:.2f}x"
        row["tflops"] = sum(r.flops for r in rs) / secs / 1e12
        if card and peaks and m in peaks:
            row["peak_kind"] = peaks[m]
            row["pct_of_peak"] = 100 * row["tflops"] / card[peaks[m]]
            verdict = f"{row['tflops']:.1f} TFLOP/s = {row['pct_of_peak']:.1f}% of {peaks[m]} peak; " + verdict
        row["verdict"] = verdict
        ratio = f"{row['ratio']:6.2f}" if "ratio" in row else "     -"
        lr = f"{row['loss_over_loop_geomean']:9.3f}" if "loss_over_loop_geomean" in row else "        -"
        below = f"{row['pairs_at_or_below_loop']}/{len(rs)}" if "pairs_at_or_below_loop" in row else "-"
        rr = f"{row['reach_ratio']:.2f}" if row.get("reach_ratio") else "-"
        wp = f"{row['worst_pair_ratio']:.2f}" if "worst_pair_ratio" in row else "-"
        print(f"  {m:<14} {row['s_per_pair']:7.1f} {row['pairs_per_hour']:8.1f} {ratio} {lr} {below:>6} "
              f"{rr:>11} {wp:>10}  {verdict}")
        out.append(row)
    return out


# -- extras: batching, profile, memory ------------------------------------------------------------------------


def batch_experiment(pairs: list[Pair], eval_net: VGGFeatures, device: torch.device, steps: int) -> list[dict]:
    """Two contents at one size (the second resized to the first's exact H x W), one style:
    one stylize call with a (2, 3, H, W) batch vs two calls, for Adam and L-BFGS."""
    first = pairs[0]
    other = next((p for p in pairs if p.content_path != first.content_path), None)
    if other is None:
        print("\n--batch needs two contents (--pairs 2xM)")
        return []
    h, w = first.hw
    im = decode.load_rgb(other.content_path).resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    second = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).unsqueeze(0)
    second = second.float().div_(255.0).contiguous().to(device)
    both = torch.cat([first.content, second])
    evs = [TutorialEvaluator(eval_net, first), TutorialEvaluator(eval_net, dataclasses.replace(first, content=second))]
    print(f"\nBatching: {first.content_path.stem} + {other.content_path.stem} at {w}x{h}, style "
          f"{first.style_path.stem}, {steps} steps, tutorial preset")
    out = []
    for opt in ("adam", "lbfgs"):
        cfg = make_config(f"{opt}:layers=tutorial;optimizer={opt};steps={steps}", device)
        sep_done = [run_nst(cfg, first, ev, device, content=c) for c, ev in zip((first.content, second), evs)]
        t_sep = sum(r.seconds for r, _, _ in sep_done)
        sep = [res for _, res, _ in sep_done]
        run, res, _ = run_nst(cfg, first, evs[0], device, content=both)
        loss_sep = [ev(r.images) for ev, r in zip(evs, sep)]
        loss_b = [ev(res.images[i:i + 1]) for i, ev in enumerate(evs)]
        diff = [b / s - 1 for b, s in zip(loss_b, loss_sep)]
        print(f"  {opt:<6} two calls {t_sep:6.1f} s, one batch {run.seconds:6.1f} s ({t_sep / run.seconds:.2f}x); "
              f"loss batch vs alone: {', '.join(f'{d:+.2%}' for d in diff)}; "
              f"max |pixel diff| {max((res.images[i] - r.images[0]).abs().max().item() for i, r in enumerate(sep)):.3g}",
              flush=True)
        out.append({"optimizer": opt, "separate_s": t_sep, "batch_s": run.seconds, "loss_separate": loss_sep,
                    "loss_batch": loss_b, "loss_rel_diff": diff})
    return out


def profile_pair(cfg: NstConfig, pair: Pair, eval_net: VGGFeatures, device: torch.device, steps: int) -> dict:
    """torch.profiler over one nst-batch run of `steps` steps, plus the per-step floor at a tiny size."""
    from torch.profiler import ProfilerActivity, profile

    short = NstConfig(cfg.name, cfg.settings, cfg.engine, dataclasses.replace(cfg.optim, steps=steps, stop_window=0),
                      cfg.cudnn_benchmark)
    ev = TutorialEvaluator(eval_net, pair)
    run_nst(short, pair, ev, device)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run, _, _ = run_nst(short, pair, ev, device)
    table = ""
    for key in (["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else []) + [
            "self_cpu_time_total"]:
        try:  # the device column's name changed across torch versions
            table = prof.key_averages().table(sort_by=key, row_limit=14)
            break
        except (KeyError, AttributeError, ValueError):
            continue
    # The floor: the same run on a 32 px image, where the convolutions cost next to nothing.
    tiny = to_tensor(decode.load_rgb(pair.content_path), 32).contiguous().to(device)
    tiny_pair = dataclasses.replace(pair, content=tiny)
    tiny_run, _, _ = run_nst(short, tiny_pair, TutorialEvaluator(eval_net, tiny_pair), device)
    ms = run.seconds / run.steps * 1000
    floor = tiny_run.seconds / tiny_run.steps * 1000
    print(f"\nProfile: {cfg.name}, {pair.name}, {steps} steps at {pair.hw[1]}x{pair.hw[0]}: {ms:.1f} ms/step; "
          f"the same at 32 px: {floor:.1f} ms/step (per-step floor: Python, autograd, L-BFGS, dispatch)")
    print(table)
    return {"ms_per_step": ms, "floor_ms_per_step_32px": floor, "table": table}


def memory_sweep(cfgs: list[NstConfig], pair: Pair, device: torch.device, sizes: list[int], steps: int) -> list[dict]:
    print(f"\nPeak memory, {steps} steps, {pair.content_path.stem} (style resized to the same H x W):")
    out = []
    for cfg in cfgs:
        optim = dataclasses.replace(cfg.optim, steps=steps, stop_window=0)
        for size in sizes:
            content = to_tensor(decode.load_rgb(pair.content_path), size).contiguous().to(device)
            p = dataclasses.replace(pair, content=content)
            row: dict[str, Any] = {"method": cfg.name, "size": size, "hw": list(p.hw)}
            try:
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    stylize(cfg.engine.net, cfg.engine.objective, content,
                            lambda h, w, p=p: _targets(cfg.engine, p, h, w, device), optim)
                    _sync(device)
                row.update(rss_mb=mem.rss_mb, rss_delta_mb=mem.rss_delta_mb, cuda_mb=mem.cuda_mb, s_per_step=(time.perf_counter() - t0) / steps)
            except torch.cuda.OutOfMemoryError:
                row["oom"] = True
                torch.cuda.empty_cache()
            print(f"  {cfg.name:<14} {size:5d} px: " + ("out of memory" if row.get("oom") else
                  f"RSS {row['rss_mb']:.0f} MiB (+{row['rss_delta_mb']:.0f} in the run)" + (f", CUDA {row['cuda_mb']:.0f} MiB" if row["cuda_mb"] else "")
                  + f", {row['s_per_step'] * 1000:.1f} ms/step"), flush=True)
            out.append(row)
    return out


def _targets(engine: Engine, pair: Pair, h: int, w: int, device: torch.device) -> losses.Targets:
    """Style targets from the style resized to exactly h x w, prepared the way Engine.style_targets does."""
    amp = engine.optim.autocast_dtype
    t = pair.style_at(h, w)
    if engine.optim.channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return losses.style_targets(engine.objective, engine.net(t, frozenset(engine.objective.style_layers)))


# -- main -----------------------------------------------------------------------------------------------------


def peak_tflops(device: torch.device) -> dict[str, float] | None:
    """Dense peak of the card (vendor figures, SXM unless the name says PCIe/NVL), or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        pcie = "PCIe" in name
        return {"bf16": 756.0 if pcie else 989.4, "tf32": 378.0 if pcie else 494.7, "fp32": 51.2 if pcie else 66.9}
    if "A100" in name:
        return {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}
    return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                           if l.startswith("model name"))
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="long side in px (default 128)")
    ap.add_argument("--pairs", default="2x2", help="N contents x M styles, the first of each folder (default 2x2)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with content/ and styles/")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--loop-steps", type=int, default=300, help="the tutorial's num_steps (default 300 -> 320 evaluations)")
    ap.add_argument("--no-loop", action="store_true", help="skip the tutorial loop (no ratios then)")
    ap.add_argument("--loop-frozen", action="store_true",
                    help="also run the loop with VGG frozen (isolates the cost of the seed's weight gradients)")
    ap.add_argument("--config", action="append", metavar="NAME:KEY=VAL;KEY=VAL",
                    help="an nst-batch configuration: Settings keys (steps, scales, optimizer, lr, stop_window, "
                         "stop_tolerance, precision, compile, layers, ...), YAML values; layers defaults to tutorial. "
                         "Repeatable; default: " + " | ".join(DEFAULT_CONFIGS))
    ap.add_argument("--no-default-row", action="store_true", help="skip nst-batch with its own defaults (gatys)")
    ap.add_argument("--target", type=float, default=4.0, help="speed-up target vs the loop (default 4)")
    ap.add_argument("--batch", action="store_true", help="also measure B=2 batching (Adam and L-BFGS)")
    ap.add_argument("--batch-steps", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="also profile one nst-batch pair (first config)")
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--memory-sizes", default="", help="e.g. 512,1024,2048: peak memory of the first config "
                    "and the default at these sizes")
    ap.add_argument("--memory-steps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write everything here (default: $OUT/bench_throughput.json if OUT is set)")
    args = ap.parse_args(argv)

    if not ((args.images / "content").is_dir() and (args.images / "styles").is_dir()):
        print(f"skipped: no test images at {args.images} (needs content/ and styles/; see --images)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    n_c, _, n_s = args.pairs.partition("x")
    pairs = load_pairs(args.images, int(n_c), int(n_s or 1), args.size, device)
    info = machine() | {"device": str(device), "size": args.size, "argv": sys.argv}
    print(json.dumps(info))

    eval_net = load_vgg19("vgg19-caffe", TUTORIAL.last_layer, device)
    norm = Normalization(eval_net)
    cnn = caffe_vgg19_features().to(device)
    specs = args.config or DEFAULT_CONFIGS
    configs = [make_config(s, device) for s in specs]
    if not args.no_default_row:
        configs.append(make_config("default:", device, base_layers=manifest.Settings().layers))
    for c in configs:
        o = c.optim
        print(f"config {c.name}: layers={c.settings.layers} steps={o.steps} scales={list(o.scales)} "
              f"optimizer={o.optimizer} stop_window={o.stop_window} stop_tolerance={o.stop_tolerance} "
              f"autocast={o.autocast_dtype} channels_last={o.channels_last} compile={c.settings.compile}")

    # Warm-up, not recorded: the first calls pay for allocator growth and oneDNN/cuDNN kernel selection.
    warm = pairs[0]
    run_style_transfer(cnn, norm, warm.content, warm.style_at(*warm.hw), num_steps=2)
    for c in configs:
        stylize(c.engine.net, c.engine.objective, warm.content, lambda h, w, c=c: _targets(c.engine, warm, h, w, device),
                dataclasses.replace(c.optim, steps=2, log_every=1))

    runs: list[Run] = []
    for i, pair in enumerate(pairs):
        ev = TutorialEvaluator(eval_net, pair)
        print(f"\n{pair.name}: {pair.hw[1]}x{pair.hw[0]} px, content-init loss {ev(pair.content):.4g}", flush=True)
        jobs: list[Callable[[], tuple[Run, Result | None, list[LogRow]]]] = []
        if not args.no_loop:
            jobs.append(lambda: (run_loop(pair, cnn, norm, ev, args.loop_steps, False, device), None, []))
            if args.loop_frozen:
                jobs.append(lambda: (run_loop(pair, cnn, norm, ev, args.loop_steps, True, device), None, []))
        jobs += [lambda c=c: run_nst(c, pair, ev, device) for c in configs]
        if i % 2:
            jobs.reverse()  # alternate the order pair by pair, so drifting machine load hits both sides alike
        done = [job() for job in jobs]
        loop_run = next((r for r, _, _ in done if r.method == "loop"), None)
        for r, res, rows in done:
            if loop_run is not None and res is not None:
                r.reach_s = reach_time(r, res, rows, max(pair.hw), loop_run.loss)
            print_run(r, loop_run)
            runs.append(r)

    # Convolutions run in TF32 by default on CUDA (cudnn.allow_tf32), so fp32 runs are judged against that peak.
    kinds = {"loop": "tf32", "loop-frozen": "tf32"} | {
        c.name: ("bf16" if c.optim.autocast_dtype is not None else "tf32") for c in configs}
    summary = summarize(runs, [p.name for p in pairs], args.target, kinds, peak_tflops(device))
    result: dict[str, Any] = {"machine": info, "configs": {c.name: c.settings.to_dict() for c in configs},
                              "runs": [dataclasses.asdict(r) for r in runs], "summary": summary,
                              "peak_tflops": peak_tflops(device)}
    if args.batch:
        result["batch"] = batch_experiment(pairs, eval_net, device, args.batch_steps)
    if args.profile:
        result["profile"] = profile_pair(configs[0], pairs[0], eval_net, device, args.profile_steps)
        result["profile"].pop("table")
    if args.memory_sizes:
        sizes = [int(s) for s in args.memory_sizes.split(",")]
        swept = [configs[0]] + ([configs[-1]] if len(configs) > 1 else [])
        result["memory"] = memory_sweep(swept, pairs[0], device, sizes, args.memory_steps)
    path = args.json or (Path(os.environ["OUT"]) / "bench_throughput.json" if os.environ.get("OUT") else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
