"""The overhead of `nst-batch run --ray local` against a plain `nst-batch run` on the same pairs.

    python3 benchmarks/bench_ray.py [--repeats 2] [--size 64] [--steps 20]

3 photos x 2 styles of ../shared/images (copied, so both runs read the same files), the CPU, one Ray
actor with as many CPUs (torch threads) as the plain run uses. Per run: wall time of the whole
command (Python, Ray and VGG start-up included) and the span from the first claim to the last pair
recorded, from the ledger (the work, without start-up), divided by the pairs. Runs alternate, so a
change in the machine's load hits both alike; the load average is printed before each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    images = ROOT.parent / "shared" / "images"
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    for kind, n in (("content", 3), ("styles", 2)):
        (tmp / kind).mkdir()
        for p in sorted(f for f in (images / kind).iterdir() if f.suffix == ".jpg")[:n]:
            shutil.copy(p, tmp / kind / p.name)
    threads = os.cpu_count() or 1
    common = ["run", "--content", str(tmp / "content"), "--styles", str(tmp / "styles"), "--size", str(a.size),
              "--steps", str(a.steps), "--device", "cpu", "-q"]
    modes = {"plain": [], "ray": ["--ray", "local", "--ray-workers", "1", "--ray-cpus-per-worker", str(threads)]}
    print(f"{a.size} px, {a.steps} steps a scale, 3 x 2 pairs, {threads} torch threads each")
    print("mode   wall_s  span_s  per_pair_s  load1")
    for i in range(a.repeats):
        for mode, extra in modes.items():
            out = tmp / f"out-{mode}-{i}"
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "nst_batch.cli", *common, "--out", str(out), *extra],
                               capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                sys.exit(f"{mode} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
            db = sqlite3.connect(out / "ledger.sqlite")
            first, last, n = db.execute("SELECT MIN(started_at), MAX(finished_at), COUNT(*) FROM pairs "
                                        "WHERE state='done'").fetchone()
            db.close()
            span = last - first
            print(f"{mode:5}  {wall:6.1f}  {span:6.1f}  {span / n:10.2f}  {load:5.2f}", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
