"""How long `write_report` takes on a big run: 500 contents × 10 styles = 5,000 pairs.

    python benchmarks/bench_report.py [--contents 500] [--styles 10] [--keep DIR]

Setup (not timed): real 64 px output PNGs, 256 px source JPEGs, a ledger with ~2% failed
and a few pairs pending or running, and a losses.csv of 30 rows per pair plus abandoned
attempts. Timed: the first report (every thumbnail made) and a second one (all reused),
and, when chromium is installed, opening the page headless until its load event.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nst_batch.report import build as report
from nst_batch.batch.plan import Pair
from nst_batch.batch.ledger import Ledger
from nst_batch.files.layout import CONTACT_SHEET, REPORT_HTML
from nst_batch.files.losslog import LOSS_COLUMNS, LOSS_LOG


def _image(path: Path, w: int, h: int, rng: np.random.Generator, fmt: str) -> None:
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    f = rng.uniform(1, 8, (3, 2))
    a = np.stack([np.sin(f[c, 0] * 6.3 * xx + f[c, 1] * 6.3 * yy) for c in range(3)], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((a + 1) * 127.5).astype(np.uint8)).save(path, fmt)


def synthesize(out: Path, n_contents: int, n_styles: int) -> None:
    rng, pyrng = np.random.default_rng(0), random.Random(0)
    src = out.parent / "src"
    contents = [src / "content" / f"photo_{i:04d}.jpg" for i in range(n_contents)]
    styles = [src / "styles" / f"style_{j:02d}.jpg" for j in range(n_styles)]
    for p in contents + styles:
        _image(p, 256, 192, rng, "JPEG")
    pairs = [Pair(c.name, s.name, c, s, f"{s.stem}/{c.stem}.png", "r", "") for s in styles for c in contents]
    ledger = Ledger(out)
    try:
        ledger.sync(pairs, out, lease_s=60)
        ledger.set_meta("settings", {"size": 64, "steps": 150, "scales": [0.5, 1.0], "out": str(out)})
        states = pyrng.choices(["done", "failed", "running", "pending"], [96, 2, 1, 1], k=len(pairs))
        now = time.time()
        ledger.db.execute("BEGIN")  # one transaction: this is setup, not the thing measured
        for i, (p, state) in enumerate(zip(pairs, states), 1):
            secs = pyrng.uniform(5, 40)
            ledger.db.execute(
                "UPDATE pairs SET state=?, attempts=?, started_at=?, finished_at=?, seconds=?, steps=300, "
                "content_loss=?, style_loss=?, tv_loss=0.01, total_loss=?, error_kind=?, error_message=? "
                "WHERE id=?",
                (state, 1 + (i % 50 == 0), now + i * 20, now + i * 20 + secs, secs if state == "done" else None,
                 0.5, 0.3, pyrng.uniform(0.5, 2) if state == "done" else None, "oom" if state == "failed" else None,
                 "out of memory at 512 px and again at 362 px" if state == "failed" else None, i))
        ledger.db.execute("COMMIT")
        rows = ledger.rows()
    finally:
        ledger.close()
    for r in rows:
        if r.state == "done":
            _image(out / r.output, 64, 48, rng, "PNG")
    with open(out / LOSS_LOG, "w") as f:
        f.write(",".join(LOSS_COLUMNS) + "\n")
        for r in rows:
            for attempt in range(1, r.attempts + 1):
                for step in range(10, 301, 10):
                    loss = 1 / step
                    f.write(f"{r.content},{r.style},{step},{loss:.6g},{2 * loss:.6g},0.01,{3 * loss:.6g},"
                            f"{step / 10:.3f},{attempt},{32 if step <= 150 else 64}\n")


def _time(label: str, fn) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"{label:<44} {dt:6.2f} s")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contents", type=int, default=500)
    ap.add_argument("--styles", type=int, default=10)
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_report_"))
    out = root / "out"
    n = args.contents * args.styles
    print(f"{args.contents} contents × {args.styles} styles = {n} pairs, {os.cpu_count()} CPU cores, in {root}")
    t0 = time.perf_counter()
    synthesize(out, args.contents, args.styles)
    print(f"{'setup (not part of the report)':<44} {time.perf_counter() - t0:6.2f} s")
    try:
        _time("write_report, first (no thumbnails yet)", lambda: report.write_report(out))
        _time("write_report, again (thumbnails reused)", lambda: report.write_report(out))
        html = out / REPORT_HTML
        print(f"{'report.html size':<44} {html.stat().st_size / 1e6:6.2f} MB")
        print(f"{'contact_sheet.jpg':<44} {Image.open(out / CONTACT_SHEET).size}")
        chromium = shutil.which("chromium")
        if chromium:
            _time("chromium --headless --dump-dom report.html", lambda: subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={root / 'chromium'}", "--dump-dom", html.as_uri()],
                capture_output=True, check=True, timeout=300))
    finally:
        if args.keep is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
