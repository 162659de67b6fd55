#!/usr/bin/env python
"""Does every pair end well below the loss it started from? Run by hand, from the repository root:

    python benchmarks/bench_recovery.py --layers tutorial --sizes 64,96,128 --steps 50
    python benchmarks/bench_recovery.py --layers gatys --sizes 128 --steps 100 --limit 2

For every pair of each --images folder (content/ x styles/; default: data/ and ../shared/images),
at each size, it makes the output with the Engine exactly as `nst-batch run` would (the manifest's
defaults plus --layers/--steps/--size; vgg19-caffe weights; CPU) and judges it with one evaluator
of its own: the objective of those settings, in fp32, at full size, on
- start: the photo resized to the size (what "doing nothing" would write), and
- final: the output image.
The ratio final/start is the measure: 1.0 means the optimiser made no progress and the photo came
back unchanged. Also the wall time and the evaluations (`steps`) per pair.

Only the Engine's public surface is used (Engine(Settings), make, objective, net, style_targets), so
the same script measures an older checkout too: `PYTHONPATH=/path/to/old/checkout python ...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nst_batch.files import decode
from nst_batch.core import losses
from nst_batch.config.manifest import Settings
from nst_batch.files.hashing import file_hash
from nst_batch.core.engine import Engine
from nst_batch.files.decode import to_tensor
from nst_batch.run.jobs import file_engine, file_job

ROOT = Path(__file__).resolve().parents[1]


def evaluate(engine: Engine, img: torch.Tensor, photo: torch.Tensor, style_path: Path, style_hash: str,
             size: int) -> float:
    """The objective's total for `img` against the photo and the style at full size, fp32, no autocast."""
    obj = engine.objective
    with torch.no_grad():
        c_tgt = losses.content_targets(obj, engine.net(photo, frozenset(obj.content_layers)))
        engine.style_pixels.add(style_hash, style_path)
        s_tgt = engine.style_targets(style_hash, size)
        return float(losses.compute(obj, engine.net(img, obj.layers), img, c_tgt, s_tgt).total.sum())


def pairs_of(folder: Path, limit: int | None) -> list[tuple[Path, Path]]:
    contents = decode.discover(folder / "content", skip=None)
    styles = decode.discover(folder / "styles", skip=None)
    pairs = [(c, s) for s in styles for c in contents]
    return pairs[:limit] if limit else pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", action="append", type=Path,
                    help="folder with content/ and styles/ (repeatable; default data/ and ../shared/images)")
    ap.add_argument("--layers", default="tutorial")
    ap.add_argument("--sizes", default="64,96,128")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of each folder only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another Settings field, value read as YAML (e.g. scales=[1.0])")
    ap.add_argument("--json", type=Path, help="write every row here too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folders = a.images or [p for p in (ROOT / "data", ROOT.parent / "shared" / "images") if (p / "content").is_dir()]
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.set)}
    if "scales" in extra:
        extra["scales"] = tuple(extra["scales"])
    rows = []
    print(f"{'folder':<8} {'pair':<58} {'px':>4} {'s':>6} {'steps':>5} {'start':>10} {'final':>10} {'ratio':>8}")
    for folder in folders:
        for c, s in pairs_of(folder, a.limit):
            im = decode.load_rgb(c, 100)
            for size in (int(x) for x in a.sizes.split(",")):
                settings = Settings(content=c.parent, styles=s.parent, out=Path("/tmp/nst-bench-recovery"),
                                    size=size, steps=a.steps, layers=a.layers, device="cpu", **extra)
                engine = file_engine(settings)
                t0 = time.perf_counter()
                (res,) = engine.make([file_job(engine, c, s, photo=to_tensor(im, settings.size))])
                secs = time.perf_counter() - t0
                photo = to_tensor(im, size)
                h = file_hash(s)
                start = evaluate(engine, photo, photo, s, h, size)
                if res.image is None:  # failed before optimising (unreadable style, out of memory)
                    print(f"{c.name} x {s.name} at {size} px: {res.error}")
                    continue
                final = evaluate(engine, res.image, photo, s, h, size)
                row = dict(folder=folder.name, content=c.name, style=s.name, px=size, seconds=round(secs, 2),
                           steps=res.steps, start=start, final=final, ratio=final / start)
                rows.append(row)
                print(f"{folder.name[:8]:<8} {(s.stem[:28] + ' x ' + c.stem)[:58]:<58} {size:>4} {secs:>6.1f} "
                      f"{res.steps:>5} {start:>10.3e} {final:>10.3e} {final / start:>8.4f}", flush=True)
    print("\nfinal/start per size (min / median / max), pairs at or above 0.9, seconds per pair (mean), steps (mean)")
    for size in sorted({r["px"] for r in rows}):
        rs = [r for r in rows if r["px"] == size]
        ratios = [r["ratio"] for r in rs]
        print(f"{size:>4} px, {len(rs)} pairs: {min(ratios):.4f} / {statistics.median(ratios):.4f} / "
              f"{max(ratios):.4f}, {sum(x >= 0.9 for x in ratios)} at or above 0.9, "
              f"{statistics.mean(r['seconds'] for r in rs):.2f} s, {statistics.mean(r['steps'] for r in rs):.1f} steps")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
