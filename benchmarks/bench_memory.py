#!/usr/bin/env python
"""Print sizes: peak memory and seconds per step of one pair, each size in a fresh process.

    python benchmarks/bench_memory.py                                   # CPU: 1024, 2048, 3072 px, fp32
    python benchmarks/bench_memory.py --device cuda --sizes 2048,4096   # GPU (benchmarks/gpu.sh runs this)

One pair (a 3:2 photo, a bundled painting, gatys, `scales: [1.0]` so every step is at the size
measured, no early stop) through the Engine's public `make`, with the engine's memory check off (the
point is to measure what the check predicts). Each size runs in its own subprocess, so one size's peak
never hides in another's. Peak memory is the pair's own: CPU, the RSS high-water mark (VmHWM, reset
through /proc/self/clear_refs after the model is loaded) less the RSS before the pair; CUDA,
torch.cuda.max_memory_allocated less what was allocated before. Seconds per step are between the first
and the last logged step (the style targets and the start/final evaluations are left out). The
prediction column is nst_batch.core.memory.need for the same shape and steps: the model fitted to these rows.
The load average is printed before and after: other processes on the machine slow the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(a: argparse.Namespace) -> dict:
    import torch

    from nst_batch.files import decode
    from nst_batch.core import memory
    from nst_batch.run.jobs import file_engine, file_job
    from nst_batch.config.manifest import Settings

    torch.manual_seed(0)
    photo, style = Path(a.photo), Path(a.style)
    s = Settings(content=photo.parent, styles=style.parent, out=Path("/nonexistent"), size=a.size, steps=a.steps,
                 scales=(1.0,), stop_window=0, log_every=1, device=a.device, precision=a.precision)
    engine = file_engine(s, free_memory=lambda device: None)  # measure, do not refuse
    device = engine.device
    im = decode.load_rgb(photo)
    w, h = decode.fit_long_side(*im.size, a.size)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        rss = _proc_status("VmRSS")
        try:  # reset the high-water mark to the current RSS: the model load's own peak must not count
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        before = rss
    t0 = time.perf_counter()
    (made,) = engine.make([file_job(engine, photo, style)])
    wall = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _proc_status("VmHWM") - before
    rows = [r for r in made.logs if r.px == a.size]
    per_step = (rows[-1].elapsed_s - rows[0].elapsed_s) / max(1, rows[-1].step - rows[0].step) if len(rows) > 1 else None
    predicted = memory.need(h, w, 1, s.optimizer, a.steps).bytes
    return {"device": str(device), "precision": engine.settings.precision, "size": a.size, "w": w, "h": h,
            "megapixels": w * h / 1e6, "steps": made.steps, "ok": made.ok, "error": str(made.error or ""),
            "peak_bytes": peak, "hwm_reset": cuda or reset, "rss_before_bytes": None if cuda else before,
            "s_per_step": per_step, "pair_wall_s": wall, "predicted_bytes": predicted,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1024,2048,3072", help="long sides in px, comma-separated")
    ap.add_argument("--steps", default="3", help="steps per size: one number, or one per size (e.g. 3,3,2)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or auto (bf16 on CUDA)")
    default_photo = ROOT.parent / "shared" / "images" / "content" / "coffee_cup.jpg"  # 600x400: 3:2, a print's shape
    ap.add_argument("--photo", default=str(default_photo if default_photo.exists() else ROOT / "data/content/coffee.jpg"))
    ap.add_argument("--style", default=str(ROOT / "data/styles/starry_night.jpg"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per size before it is given up")
    ap.add_argument("--json", default=None, help="write the rows here too")
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.steps = int(a.steps)
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    sizes = [int(x) for x in a.sizes.split(",")]
    steps = [int(x) for x in a.steps.split(",")]
    steps = steps * len(sizes) if len(steps) == 1 else steps
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"photo {Path(a.photo).name}, style {Path(a.style).name}, {a.device}, {a.precision}", flush=True)
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for size, n in zip(sizes, steps):
        cmd = [sys.executable, __file__, "--child", "--size", str(size), "--steps", str(n), "--device", a.device,
               "--precision", a.precision, "--photo", a.photo, "--style", a.style]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"{size:5d} px: gave up after {a.timeout:.0f} s", flush=True)
            continue
        got = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not got:
            print(f"{size:5d} px: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = got[0]
        rows.append(r)
        sps = f"{r['s_per_step']:.2f} s/step" if r["s_per_step"] is not None else "n/a s/step"
        print(f"{size:5d} px ({r['w']}x{r['h']}, {r['megapixels']:.2f} MP, {r['steps']} steps, {r['precision']}): "
              f"peak {r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_bytes'] / (r['w'] * r['h']):.0f} B/px), predicted "
              f"{r['predicted_bytes'] / 2**20:.0f} MiB; {sps}; pair {r['pair_wall_s']:.1f} s"
              + ("" if r["hwm_reset"] else " (peak since process start: clear_refs refused)"), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"load_after": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
