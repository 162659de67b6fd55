#!/usr/bin/env python
"""A slice of a collection-sized plan, end to end through the CLI: decode to files (benchmarks/gpu.sh,
PARTS=slice).

    python3 benchmarks/bench_slice.py                                   # 10,000 photos x 20 styles, shard 1/100
    python3 benchmarks/bench_slice.py --device cpu --dry-run            # a tiny check that it runs

It builds a collection of `--photos` 3:2 photos and `--styles` styles in `--work` (each photo file a hard
link to one of a few hundred distinct crops of --images content/, so 10,000 of them cost seconds and a few
MB; the styles distinct crops of --images styles/, each its own Gram targets), then runs
`nst-batch run --shard 1/N` on it: shard 1 of 100 of a 10,000 x 20 plan is ~2,000 pairs of every style,
planned, claimed, decoded, optimised, encoded and recorded as in a real night. The run is stopped with
Ctrl-C (SIGINT, as a user would) after `--seconds` (gpu.sh: 200 s, to fit a lease; `--seconds 0` makes the
whole slice, ~10-20 minutes on one card at the projected rate); what it made is read from its ledger. Reported: the
plan's start-up (seconds until the first pair started), pairs made, pairs/hour over the making, the mean
final loss, the GPU's busy share over the same window (nvidia-smi, every 0.5 s), and the whole plan's
projected hours at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_batch.batch.ledger import open_ledgers  # noqa: E402


def _crops(files: list[Path], n: int, size: int, ratio: float) -> list[Image.Image]:
    """n distinct crops (long side `size`, width/height `ratio`) of the files, shifted and mirrored."""
    base = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in files]
    out = []
    for i in range(n):
        im, v = base[i % len(base)], i // len(base)
        W, H = im.size
        cw, ch = min(W, round(H * ratio)), min(H, round(W / ratio))
        cw, ch = cw - (v % 7) * cw // 20, ch - (v % 7) * ch // 20  # a little smaller each round: distinct
        left, top = (W - cw) * (v % 5) // 4, (H - ch) * ((v // 5) % 3) // 2
        crop = im.crop((left, top, left + cw, top + ch))
        crop = crop.resize((size, round(size / ratio)) if ratio >= 1 else (round(size * ratio), size),
                           Image.Resampling.LANCZOS)
        out.append(ImageOps.mirror(crop) if v % 2 else crop)
    return out


def build(images: Path, work: Path, photos: int, styles: int, size: int, distinct: int) -> tuple[Path, Path]:
    content, style_dir = work / "content", work / "styles"
    if (work / "built.json").is_file() and json.loads((work / "built.json").read_text()) == [photos, styles, size]:
        return content, style_dir
    shutil.rmtree(work, ignore_errors=True)
    content.mkdir(parents=True)
    style_dir.mkdir()
    pick = lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))  # noqa: E731
    originals = []
    for i, im in enumerate(_crops(pick(images / "content"), min(distinct, photos), size, 1.5)):
        p = work / f"original_{i:04d}.jpg"
        im.save(p, quality=92)
        originals.append(p)
    for i in range(photos):  # a folder per thousand, as a real collection has them
        p = content / f"{i // 1000:02d}" / f"photo_{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        os.link(originals[i % len(originals)], p)
    for i, im in enumerate(_crops(pick(images / "styles"), styles, min(size, 512), 1.25)):
        im.save(style_dir / f"style_{i:02d}.jpg", quality=92)
    (work / "built.json").write_text(json.dumps([photos, styles, size]))
    return content, style_dir


def gpu_sampler() -> subprocess.Popen | None:
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                             "-lms", "500"], stdout=subprocess.PIPE, text=True)


def busy_share(sampler: subprocess.Popen | None, t0: float, t1: float, started: float) -> float | None:
    """Mean GPU utilisation (nvidia-smi's 'utilization.gpu': share of time a kernel ran) over the samples taken
    between t0 and t1 (seconds since `started`, the sampler's start)."""
    if sampler is None:
        return None
    sampler.terminate()
    lines = sampler.communicate()[0].splitlines()
    values = [float(line.rsplit(",", 1)[1]) for line in lines if "," in line]
    period = 0.5
    window = [v for i, v in enumerate(values) if t0 <= i * period <= t1]
    return statistics.mean(window) / 100 if window else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nst-slice"))
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--styles", type=int, default=20)
    ap.add_argument("--shards", type=int, default=100, help="the slice is shard 0 of this many")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=200.0,
                    help="stop the run (SIGINT) after this long; 0: make the whole slice")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for the run, repeatable")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="200 photos x 4 styles at 48 px, 10 steps, 60 s")
    a = ap.parse_args()
    sets = ["method=optimize", "batch=auto"] + a.set
    if a.dry_run:
        a.photos, a.styles, a.shards, a.size, a.seconds = 200, 4, 4, 48, min(a.seconds, 60.0)
        sets += ["steps=10", "scales=[1.0]"]
    if not (a.images / "content").is_dir():
        a.images = ROOT / "data"
    t = time.perf_counter()
    content, styles = build(a.images, a.work, a.photos, a.styles, a.size, distinct=300)
    built_s = time.perf_counter() - t
    out = a.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "nst_batch", "run", "--content", str(content), "--styles", str(styles),
           "--out", str(out), "--size", str(a.size), "--device", a.device, "--shard", f"0/{a.shards}", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    print(f"collection: {a.photos} photos x {a.styles} styles ({built_s:.1f} s to build); running shard 0/{a.shards} "
          f"for {a.seconds:.0f} s: {' '.join(cmd[3:])}", flush=True)
    sampler, started = gpu_sampler(), time.time()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run.wait(timeout=a.seconds or None)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGINT)  # as a user stops a run: claims given back, made pairs kept
        run.wait(timeout=120)
    ended = time.time()
    err = run.stderr.read() if run.stderr else ""
    with open_ledgers(out) as ledger:
        rows = list(ledger.rows())
    done = [r for r in rows if r.state == "done"]
    failed = [r for r in rows if r.state == "failed"]
    first = min((r.started_at for r in rows if r.started_at), default=None)
    last = max((r.finished_at for r in done), default=None)
    making_s = (last - first) if done and first and last and last > first else None
    rate = len(done) / making_s * 3600 if making_s else None
    gpu = busy_share(sampler, (first or started) - started, (last or ended) - started, started)
    result = {
        "photos": a.photos, "styles": a.styles, "slice_pairs": len(rows), "size": a.size, "sets": sets,
        "device": a.device, "startup_s": round(first - started, 1) if first else None,
        "made": len(done), "failed": len(failed), "making_s": round(making_s, 1) if making_s else None,
        "pairs_per_hour": round(rate) if rate else None,
        "mean_final_loss": statistics.mean(r.total_loss for r in done) if done else None,
        "styles_touched": len({r.style for r in done}),
        "gpu_busy": round(gpu, 3) if gpu is not None else None,
        "projected_hours_whole_plan": round(a.photos * a.styles / rate, 2) if rate else None,
        "run_rc": run.returncode, "wall_s": round(ended - started, 1),
    }
    if failed:
        result["first_failure"] = f"{failed[0].error_kind}: {failed[0].error_message}"
    if run.returncode not in (0, 130) and err:
        result["stderr_tail"] = err[-2000:]
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
