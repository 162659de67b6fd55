#!/usr/bin/env python
"""Pairs per hour through Engine.make at one size, per `batch`: what the batched L-BFGS, the CUDA graphs and
`batch: auto` buy on a GPU (benchmarks/gpu.sh, PARTS=throughput).

    python3 benchmarks/bench_gpu_throughput.py --device cuda                 # 512 px, batch 1 8 32 64 auto
    python3 benchmarks/bench_gpu_throughput.py --device cpu --dry-run        # a tiny check that it runs

Photos: 3:2 crops of --images content/ (flipped and shifted for more than there are), all one working
shape, so a batch holds them all; one style. Each `batch` value makes `batch` pairs in one Engine.make
(auto: as many as Engine.batch_size resolves), one scale, `steps` evaluations (stop rule off: every row
does the same work per image). Per row: seconds, pairs/hour, ms per step, TFLOP/s (vgg.flops_per_step:
forward + input gradient) and its share of the card's bf16 peak, the mean final loss (the engine's own
objective), and how many CUDA graphs were captured. A row `eager` turns the graphs off, to see them.

On CUDA every chunk of L-BFGS iterations (lbfgs.run_chunk) runs under
torch.cuda.set_sync_debug_mode("error"): a host read inside a chunk fails the row (its error is printed)
instead of passing unseen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_throughput, next to this file
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_batch.config.manifest import Settings  # noqa: E402
from nst_batch.core import lbfgs  # noqa: E402
from nst_batch.core.engine import Engine, resolve  # noqa: E402
from nst_batch.core.vgg import flops_per_step, resize  # noqa: E402
from nst_batch.files import decode  # noqa: E402
from nst_batch.files.decode import to_tensor  # noqa: E402
from nst_batch.files.stage import StyleImages  # noqa: E402
from nst_batch.run.jobs import file_job  # noqa: E402


def photos(folder: Path, n: int, size: int) -> list[tuple[str, torch.Tensor]]:
    """n photos (1, 3, h, w), 3:2 landscape at long side `size`: crops of the folder's photos, shifted and
    flipped when more are asked for than there are."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    h, w = round(size * 2 / 3), size
    base = [to_tensor(decode.load_rgb(p), 2 * size) for p in files]
    out = []
    for i in range(n):
        full, v = base[i % len(base)], i // len(base)
        H, W = full.shape[-2:]
        ch, cw = min(H, W * 2 // 3), min(W, H * 3 // 2)
        top, left = (H - ch) * (v % 3) // 2, (W - cw) * ((v // 3) % 3) // 2
        crop = resize(full[..., top:top + ch, left:left + cw], h, w).clamp(0, 1)
        out.append((f"{files[i % len(files)].stem}#{v}", crop.flip(-1) if v % 2 else crop))
    return out


def strict_chunks() -> None:
    """Every chunk of L-BFGS iterations (eager, the warm-up, and what a graph captures) under lbfgs.sync_checked:
    a host read inside one raises, and fails its row."""
    lbfgs.run_chunk = lbfgs.sync_checked(lbfgs.run_chunk)


def engine_for(s: Settings, device: torch.device, graphs: bool) -> Engine:
    config = resolve(s, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    config = dataclasses.replace(config, cuda_graphs=graphs and device.type == "cuda")
    return Engine(s, device, config, style_pixels=StyleImages(s.max_megapixels))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(engine: Engine, pics, style: Path, batch: int, device: torch.device) -> dict:
    """One Engine.make of `batch` pairs; what it took and gave."""
    root = Path(".")
    jobs = [file_job(engine, root / name, style, content=name, photo=t) for name, t in pics[:batch]]
    notes: list[str] = []
    _sync(device)
    t0 = time.perf_counter()
    made = engine.make(jobs, on_note=notes.append)
    _sync(device)
    secs = time.perf_counter() - t0
    ok = [m for m in made if m.ok]
    errors = sorted({f"{m.error.kind}: {m.error}"[:300] for m in made if not m.ok})
    h, w = pics[0][1].shape[-2:]
    steps = sum(m.steps for m in ok)
    flops = steps * flops_per_step(h, w, engine.objective.last_layer)
    return dict(pairs=len(jobs), done=len(ok), seconds=secs, pairs_per_hour=3600 * len(ok) / secs if ok else 0.0,
                ms_per_step=1000 * secs / max(1, steps // max(1, len(ok))), tflops=flops / secs / 1e12,
                mean_final_loss=statistics.mean(m.final.total for m in ok) if ok else None,
                captures=getattr(engine.chunks, "captures", 0), notes=notes, errors=errors)


def parse_batches(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batches", default="1,8,32,64,auto")
    ap.add_argument("--eager", default="1,8", help="batch values also run without CUDA graphs")
    ap.add_argument("--budget-s", type=float, default=420, help="skip a row predicted to end past this")
    ap.add_argument("--dry-run", action="store_true", help="tiny: 48 px, 12 steps, batches 1,2,auto")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.dry_run:
        a.size, a.steps, a.batches, a.eager = 48, 12, "1,2,auto", "2"
    if not (a.images / "content").is_dir():
        a.images = ROOT / "data"
    device = torch.device(a.device)
    peak = None
    if device.type == "cuda":
        from bench_throughput import peak_tflops

        peak = (peak_tflops(device) or {}).get("bf16")
    s = Settings(content=a.images / "content", styles=a.images / "styles", size=a.size, steps=a.steps,
                 scales=(1.0,), stop_window=0, device=str(device), log_every=max(10, a.steps))
    style = sorted(p for p in (a.images / "styles").iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    if device.type == "cuda":
        strict_chunks()
    auto = engine_for(s.replace(batch="auto"), device, True)
    pics = photos(a.images / "content", 1, a.size)
    auto_n = auto.batch_size(file_job(auto, Path(pics[0][0]), style, content=pics[0][0], photo=pics[0][1]))
    wanted = [(b, int(b) if b != "auto" else auto_n, True) for b in parse_batches(a.batches)]
    wanted += [(b, int(b), False) for b in parse_batches(a.eager)]
    pics = photos(a.images / "content", max(n for _, n, _ in wanted), a.size)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{a.size} px ({pics[0][1].shape[-1]}x{pics[0][1].shape[-2]}), {a.steps} steps, style {style.name}, "
          f"batch auto = {auto_n}, bf16 peak {peak} TFLOP/s", flush=True)
    warm = engine_for(s.replace(steps=2), device, False)  # model load and cuDNN's first search, untimed
    run_row(warm, pics, style, 1, device)
    rows, start, per_image_step = [], time.perf_counter(), None
    for label, n, graphs in wanted:
        if per_image_step is not None:
            guess = per_image_step * n * a.steps
            if time.perf_counter() - start + guess > a.budget_s:
                print(f"batch {label:>4} ({n}) {'graphs' if graphs else 'eager'}: skipped, ~{guess:.0f} s would pass "
                      f"the {a.budget_s:.0f} s budget", flush=True)
                continue
        same = next((r for r in rows if r["graphs"] and r["size"] == n), None) if label == "auto" else None
        if same is not None:  # auto resolved to a batch already measured: that row is auto's
            rows.append({**same, "batch": "auto"})
            print(f"batch auto ({n:2d}): the batch {same['batch']} row", flush=True)
            continue
        engine = auto if (label == "auto" and graphs) else engine_for(s.replace(batch=n), device, graphs)
        row = dict(batch=label, size=n, graphs=graphs, **run_row(engine, pics, style, n, device))
        if row["done"]:
            per_image_step = row["seconds"] / (n * a.steps)
        row["share_of_bf16_peak"] = row["tflops"] / peak if peak else None
        rows.append(row)
        share = f"{100 * row['share_of_bf16_peak']:.1f}% of bf16 peak" if peak else "-"
        loss = f"{row['mean_final_loss']:.4g}" if row["mean_final_loss"] is not None else "-"
        print(f"batch {label:>4} ({n:2d}) {'graphs' if graphs else 'eager '}: {row['seconds']:7.1f} s, "
              f"{row['pairs_per_hour']:8.0f} pairs/h, {row['ms_per_step']:7.1f} ms/step, {row['tflops']:7.2f} TFLOP/s "
              f"({share}), mean final loss {loss}, {row['done']}/{n} done, graphs captured {row['captures']}"
              + (f", notes {row['notes']}" if row["notes"] else "") + (f", errors {row['errors']}" if row["errors"] else ""),
              flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps(dict(size=a.size, steps=a.steps, peak_bf16=peak, rows=rows), indent=1))
    return 0 if rows and all(r["done"] == r["size"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
