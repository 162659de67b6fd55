"""The bookkeeping of a whole collection, without the model: 10,000 photos × 20 styles = 200,000 pairs.

    python benchmarks/bench_scale.py                       # the full size, in a temporary folder
    python benchmarks/bench_scale.py --photos 1000 --styles 5 --keep /tmp/scale   # smaller, kept

Setup (not timed): real, tiny JPEG files (32 × 24 px, each different), made by this script.
Each phase then runs in a fresh Python process, so its time includes what a real `nst-batch`
command pays (imports included) and its peak memory is its own:

- plan, cold:  make_plan + ledger sync on a new output folder (every file hashed once), as `run`
               does it: known hashes from the ledger, plan, store the hashes, sync;
- plan, warm:  the same again, nothing changed (what a resumed run pays before its first pair);
- claims:      `Ledger.claim` timed one by one at 200,000 pending (p50, p99), each pair recorded
               done before the next claim as a worker does: plain claims, claims of one style
               (filling a batch, the last style), claims of a retry's 10,000 ids; `done()` per
               second; the whole claim + heartbeat + done cycle per second;
- status:      what `nst-batch status` does (read the ledger, summarize);
- resume:      plan + sync when every pair is done and its output is on disk (a finished collection
               run again: each output's presence is checked). Marks every pair done: run it after
               `claims` and `status`;
- report:      `write_report` on a ledger where every pair is done (outputs are hard links to one
               tiny PNG, losses.csv has 15 rows a pair), as this version's runner leaves OUT (each
               output's thumbnail written, each pair's 60-point curve in the ledger): first build
               and rebuild, pages, largest page, and what the runner's part costs a pair;
- report_old:  the same for a run from before those (no output thumbnails, no stored curves): the
               first build makes 200,000 thumbnails.

Figures go to the terminal and, with --json, to a file. Nothing here runs VGG.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve()
PHASES = ("cold", "warm", "claims", "status", "resume", "report", "report_old")


def _settings(root: Path):
    from nst_batch.config.manifest import Settings

    return Settings(content=root / "content", styles=root / "styles", out=root / "out", size=64, steps=150,
                    device="cpu")


def setup(root: Path, photos: int, styles: int) -> None:
    rng = np.random.default_rng(0)
    for folder, n, stem in (("content", photos, "photo"), ("styles", styles, "style")):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            # Noise over a gradient: each file differs, so each hashes differently, as photos do.
            a = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / f"{stem}_{i:05d}.jpg", "JPEG", quality=80)


def _plan_and_sync(root: Path) -> dict:
    """What local.run does before its first claim, without the model."""
    from nst_batch.batch.ledger import Ledger
    from nst_batch.batch import plan as planning
    from nst_batch.files import encode, hashing

    s = _settings(root)
    read = []

    def counted(path: Path) -> str:
        read.append(path)
        return hashing.file_hash(path)

    t0 = time.perf_counter()
    hashes = hashing.HashCache(Ledger.stored_hashes(s.out), counted)
    plan = planning.make_plan(s, hashes)
    t1 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(s.out)
    try:
        ledger.store_hashes(*hashes.changes())
        counts = ledger.sync(plan, s.out, s.lease_s)
    finally:
        ledger.close()
    t2 = time.perf_counter()
    return {"pairs": len(plan), "files_read": len(read), "plan_s": t1 - t0, "sync_s": t2 - t1,
            "total_s": t2 - t0, **{f"sync_{k}": v for k, v in counts.items()}}


def _percentiles(name: str, times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {f"{name}_p50_ms": ms[len(ms) // 2], f"{name}_p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            f"{name}_max_ms": ms[-1]}


def phase_claims(root: Path, n: int) -> dict:
    from nst_batch.batch.ledger import Finished, Ledger, worker_id

    out = _settings(root).out
    ledger = Ledger(out)
    try:
        pending = ledger.counts()["pending"]
        last_style = ledger.db.execute("SELECT MAX(style) FROM pairs").fetchone()[0]
        retry = set(np.random.default_rng(2).choice(pending, 10_000, replace=False).tolist())
        worker = worker_id()
        res: dict = {"pending": pending, "claims": n}
        ids, done_s = [], 0.0
        for name, kw in (("claim", {}), ("claim_style", {"style": last_style}), ("claim_only", {"only": retry})):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                row = ledger.claim(worker, 120.0, **kw)
                t1 = time.perf_counter()
                # Recorded before the next claim, as a worker does: it holds a few claims at a time.
                ledger.done(Finished(row.id, worker, 150, 0.5, 0.3, 0.01, 0.81))
                done_s += time.perf_counter() - t1
                times.append(t1 - t0)
                ids.append(row.id)
            res.update(_percentiles(name, times))
        res["done_per_s"] = len(ids) / done_s if done_s else None
        t0 = time.perf_counter()  # the whole bookkeeping of a pair, as a worker does it
        for _ in range(n):
            row = ledger.claim(worker, 120.0)
            ledger.heartbeat(row.id, worker)
            ledger.done(Finished(row.id, worker, 150, 0.5, 0.3, 0.01, 0.81, recipe=row.recipe))
            ids.append(row.id)
        res["claim_heartbeat_done_per_s"] = n / (time.perf_counter() - t0)
        # Leave the ledger as it was: these pairs pending again, for the next phases and reruns.
        with ledger._tx() as db:
            db.executemany("UPDATE pairs SET state='pending', worker=NULL, attempts=0, steps=NULL, "
                           "content_loss=NULL, style_loss=NULL, tv_loss=NULL, total_loss=NULL, seconds=NULL, "
                           "started_at=NULL, finished_at=NULL WHERE id=?", [(i,) for i in ids])
    finally:
        ledger.close()
    return res


def phase_resume(root: Path) -> dict:
    from nst_batch.batch.ledger import Ledger

    out = _settings(root).out
    t0 = time.perf_counter()
    ledger = Ledger(out)
    try:
        ledger.db.execute("BEGIN")
        ledger.db.execute("UPDATE pairs SET state='done', attempts=1, seconds=1.5, worker=NULL")
        ledger.db.execute("COMMIT")
        outputs = ledger.outputs()
    finally:
        ledger.close()
    _link_outputs(out, outputs, np.random.default_rng(1))
    prep = time.perf_counter() - t0
    return {"setup_not_timed_s": prep, **_plan_and_sync(root)}


def _link_outputs(out: Path, outputs: list[str], rng) -> None:
    """An output file for each pair: hard links to one tiny PNG per style (file systems cap the links
    of one inode), so 200,000 real directory entries cost little disk."""
    for rel in outputs:
        target = out / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            proto = target.parent / ".proto.png"
            if not proto.exists():
                Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(proto)
            os.link(proto, target)


def phase_status(root: Path) -> dict:
    from nst_batch.report import status

    out = _settings(root).out
    t0 = time.perf_counter()
    summary = status.load_summary(out)
    return {"status_s": time.perf_counter() - t0, "pairs": summary.total}


def _finish_all(out: Path, runner_side: bool) -> dict:
    """Every pair done, with an output file (hard links: 200,000 real files, one inode per style, as
    file systems cap the links of one inode) and loss rows (15 a pair in losses.csv). With
    `runner_side`, as a run of this version leaves OUT: each pair's curve in the ledger (60 points, the
    most curve_record keeps: the largest pages) and each output's thumbnail, written as the runner
    writes them; without, as a run from before them: neither, so the report makes the thumbnails and
    (losses.csv being far over its limit) draws no curve. Returns what the runner's part cost a pair."""
    from types import SimpleNamespace

    from nst_batch.files import encode, layout, losslog
    from nst_batch.report import build as report
    from nst_batch.files.layout import thumb_path, write_atomic
    from nst_batch.batch.ledger import Ledger
    from nst_batch.files.losslog import LOSS_COLUMNS, LOSS_LOG

    rng = np.random.default_rng(1)
    for folder in (layout.THUMBS, layout.STYLES, layout.SHEETS):
        shutil.rmtree(out / folder, ignore_errors=True)  # a first build: nothing left from a previous one
    log = [SimpleNamespace(step=step, px=32 if step <= 150 else 64, content=0.5, style=3 / step, total=0.51 + 3 / step)
           for step in range(5, 301, 5)]  # 60 rows, as a 300-step run logging every 5 steps writes them
    t0 = time.perf_counter()
    curve = losslog.curve_record(log)
    curve_us = (time.perf_counter() - t0) * 1e6
    ledger = Ledger(out)
    try:
        now = time.time()
        ledger.db.execute("BEGIN")
        ledger.db.execute("UPDATE pairs SET state='done', attempts=1, started_at=?+id*2, finished_at=?+id*2+1.5, "
                          "seconds=1.5, steps=150, content_loss=0.5, style_loss=0.3, tv_loss=0.01, "
                          "total_loss=0.81, worker=NULL, curve=?", (now, now, curve if runner_side else None))
        ledger.db.execute("COMMIT")
        rows = ledger.rows()
    finally:
        ledger.close()
    _link_outputs(out, [r.output for r in rows], rng)
    with open(out / LOSS_LOG, "w") as f:
        f.write(",".join(LOSS_COLUMNS) + "\n")
        for r in rows:
            f.writelines(f"{r.content},{r.style},{step},0.5,{3 / step:.6g},0.01,{0.51 + 3 / step:.6g},"
                         f"{step / 100:.3f},1,{32 if step <= 75 else 64}\n" for step in range(10, 151, 10))
    res = {"curve_record_us": curve_us, "curve_bytes": len(curve), "losses_csv_mb": (out / LOSS_LOG).stat().st_size / 1e6}
    if runner_side:
        # The runner's call, timed on the first 1,000 outputs; the rest get the same bytes (the outputs
        # of a style are one file here), so setting up 200,000 costs less than making them.
        first, t, data = rows[:1000], 0.0, {}
        for r in first:
            with Image.open(out / r.output) as im:
                im.load()
                t0 = time.perf_counter()
                encode.write_thumbnail(out / thumb_path("o", r.output), im)
                t += time.perf_counter() - t0
            data.setdefault(r.style, (out / thumb_path("o", r.output)).read_bytes())
        for r in rows[1000:]:
            b = data.get(r.style)
            if b is None:
                with Image.open(out / r.output) as im:
                    b = data[r.style] = encode.thumbnail_jpeg(im)
            write_atomic(out / thumb_path("o", r.output), lambda f: f.write(b), durable=False)
        res["runner_thumb_ms"] = t / len(first) * 1000
    res["ledger_mb"] = (out / "ledger.sqlite").stat().st_size / 1e6
    return res


def phase_report(root: Path, runner_side: bool = True) -> dict:
    from nst_batch.report import build as report
    from nst_batch.files import layout

    out = _settings(root).out
    t0 = time.perf_counter()
    setup = _finish_all(out, runner_side)
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    report.write_report(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    report.write_report(out)
    again = time.perf_counter() - t0
    pages = [out / layout.REPORT_HTML, *(out / layout.STYLES).glob("*.html")]
    largest = max(pages, key=lambda p: p.stat().st_size)
    sheets = [out / layout.CONTACT_SHEET, *(out / layout.SHEETS).glob("*.jpg")]
    return {"setup_not_timed_s": prep, **setup, "report_first_s": first, "report_again_s": again,
            "pages": len(pages), "largest_page": largest.relative_to(out).as_posix(),
            "largest_page_mb": largest.stat().st_size / 1e6,
            "front_page_mb": (out / layout.REPORT_HTML).stat().st_size / 1e6,
            "all_pages_mb": sum(p.stat().st_size for p in pages) / 1e6, "sheets": len(sheets),
            "largest_sheet_mb": max(p.stat().st_size for p in sheets) / 1e6}


def run_phase(name: str, root: Path, args) -> dict:
    if name == "cold":
        shutil.rmtree(_settings(root).out, ignore_errors=True)
        res = _plan_and_sync(root)
    elif name == "warm":
        res = _plan_and_sync(root)
    elif name == "claims":
        res = phase_claims(root, args.claims)
    elif name == "status":
        res = phase_status(root)
    elif name == "resume":
        res = phase_resume(root)
    elif name == "report":
        res = phase_report(root)
    else:
        res = phase_report(root, runner_side=False)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _child(name: str, root: Path, args) -> dict:
    cmd = [sys.executable, str(HERE), "--phase", name, "--keep", str(root), "--claims", str(args.claims)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {args.timeout} s"}
    wall = time.perf_counter() - t0
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall  # with interpreter start and imports, as a user's command pays them
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--styles", type=int, default=20)
    ap.add_argument("--claims", type=int, default=1000, help="claims to time of each kind (each a full claim)")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a phase may take before it is abandoned")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.keep, args)))
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results: dict = {"photos": args.photos, "styles": args.styles, "cpus": os.cpu_count(),
                     "loadavg_at_start": os.getloadavg()[0]}
    try:
        if not (root / "content").is_dir():
            t0 = time.perf_counter()
            setup(root, args.photos, args.styles)
            print(f"setup: {args.photos} photos + {args.styles} styles in {root} "
                  f"({time.perf_counter() - t0:.1f} s, not part of any figure)")
        for name in args.only.split(","):
            res = results[name] = _child(name, root, args)
            print(f"{name:<7} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in res.items()), flush=True)
        results["loadavg_at_end"] = os.getloadavg()[0]
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
