#!/usr/bin/env python
"""Learned per-style networks vs optimisation, on real photos, on this machine, by hand:

    python benchmarks/bench_network.py --photos /tmp/realphotos --size 128 --threads 1   # from the repository root
    python benchmarks/bench_network.py --sheet-only --photos /tmp/realphotos              # the contact sheet again
    python benchmarks/bench_network.py --device cuda --gpu-only                          # per-step GPU figures (gpu.sh)

Photos: every image in --photos (default: data/content and ../shared/images/content), at --size.
Per style (--styles):
- the network is trained ONCE (network_steps, default 600) on the runner's sample of the photos
  (batch/methods.even_sample, network.TRAIN_PHOTOS): its cost does not depend on N;
- then photo by photo, INTERLEAVED so that the machine's load falls on every method alike: `optimize`
  (the engine's defaults), then the network's forward pass followed by each refine variant of --refine.
  A variant "H+F" is H L-BFGS steps at half size from the network's output (downsampled), then F steps at
  full size (from the half-size result upsampled, with the network output's own finer detail put back);
  "0+F" is the engine's refine_config as it was (F steps at full size); "0+0" the network alone. The stop
  rule (stop_window, stop_tolerance) applies to every scale, as in `optimize`; "R" alone (no +) is the
  engine's refine_config as it is now, through Engine.make (method network), so the default is measured
  as the runner does it.
Every final image is scored by one evaluator (the gatys objective, fp32, at full size). The load average
is recorded at every photo. Both methods are linear in N, so totals for any N are train + N x per photo.
Writes a JSON (rewritten after every photo), the images under --work, and a contact sheet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_batch.batch.methods import even_sample  # noqa: E402
from nst_batch.config.manifest import Settings  # noqa: E402
from nst_batch.config.objective import MIN_SIDE  # noqa: E402
from nst_batch.core import losses, network  # noqa: E402
from nst_batch.core.engine import Engine  # noqa: E402
from nst_batch.core.pyramid import stylize  # noqa: E402
from nst_batch.core.vgg import resize  # noqa: E402
from nst_batch.files import decode  # noqa: E402
from nst_batch.files.decode import to_tensor  # noqa: E402
from nst_batch.files.encode import to_pil  # noqa: E402
from nst_batch.run.jobs import file_engine, file_job  # noqa: E402

SUFFIXES = (".jpg", ".jpeg", ".png")


def find_photos(folder: Path | None) -> list[Path]:
    """In a fixed shuffled order: a run cut short (or --limit) has measured a varied sample, not the first
    names of the alphabet."""
    dirs = [folder] if folder else [ROOT / "data/content", ROOT.parent / "shared/images/content"]
    photos = sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.suffix.lower() in SUFFIXES)
    random.Random(0).shuffle(photos)
    return photos


class Scorer:
    """The gatys objective of a final image, fp32, at its own size: one judge for every method."""

    def __init__(self, engine: Engine, key: str):
        self.e, self.key = engine, key

    def __call__(self, photo: torch.Tensor, img: torch.Tensor) -> float:
        e = self.e
        obj = e.objective
        with torch.no_grad():
            c = losses.content_targets(obj, e.net(photo, frozenset(obj.content_layers)))
            s = e.style_targets(self.key, e.settings.style_px(max(photo.shape[-2:])))
            return float(losses.compute(obj, e.net(img.clamp(0, 1), obj.layers), img, c, s).total)


def refine(engine: Engine, key: str, c: torch.Tensor, init: torch.Tensor, half: int, full: int) -> torch.Tensor:
    """Variant "half+full" of the network's refinement (see the module's doc)."""
    H, W = c.shape[-2:]
    style_full = engine.settings.style_px(max(H, W))

    def style_for(h: int, w: int) -> losses.Targets:
        return engine.style_targets(key, max(MIN_SIDE, round(style_full * max(h, w) / max(H, W))))

    cfg = dataclasses.replace(engine.optim, scales=(1.0,))
    x = init
    if half:
        h, w = round(H / 2), round(W / 2)
        coarse = resize(init, h, w).clamp(0, 1)
        r = stylize(engine.net, engine.objective, resize(c, h, w).clamp(0, 1), style_for,
                    dataclasses.replace(cfg, steps=half), init=coarse)
        x = (resize(r.images.to(c.device), H, W) + init - resize(coarse, H, W)).clamp(0, 1)
    if full:
        x = stylize(engine.net, engine.objective, c, style_for, dataclasses.replace(cfg, steps=full), init=x).images
    return x.cpu()


def one_photo(engine: Engine, style: Path, key: str, p: Path, size: int, variants: list[str]) -> tuple[dict, dict]:
    """optimize, then every refine variant, on one photo: (row of times and losses, images)."""
    dev = engine.device
    score = Scorer(engine, key)
    c = to_tensor(decode.load_rgb(p), size).to(dev)
    row: dict = {"photo": p.name, "shape": list(c.shape[-2:]), "load": os.getloadavg()[0],
                 "photo_loss": score(c, c)}
    t = time.perf_counter()
    m = engine.make([file_job(engine, p, style, key=key, photo=c.cpu())])[0]
    row["optimize"] = {"s": time.perf_counter() - t, "loss": score(c, m.image.to(dev)), "steps": m.steps}
    images = {"photo": c.cpu(), "optimize": m.image}
    for v in variants:
        t = time.perf_counter()
        if "+" in v:
            out = network.apply(engine.model(key), c)
            half, full = (int(x) for x in v.split("+"))
            img, steps = refine(engine, key, c, out, half, full) if half or full else out.cpu(), None
        else:  # the engine's own refine (refine_config), as a run makes a network pair
            made = engine.make([file_job(engine, p, style, key=key, photo=c.cpu(), method="network")])[0]
            img, steps = made.image, made.steps
        row[v] = {"s": time.perf_counter() - t, "loss": score(c, img.to(dev)), "steps": steps}
        images[v] = img
    row["load_after"] = os.getloadavg()[0]
    return row, images


def summary(rows: list[dict], variants: list[str], train_s: float) -> dict:
    """Means over the photos, loss ratios (mean of per-photo ratios and ratio of means), totals, break-even."""
    n = len(rows)
    mean = lambda f: sum(f(r) for r in rows) / n  # noqa: E731
    t_opt, l_opt = mean(lambda r: r["optimize"]["s"]), mean(lambda r: r["optimize"]["loss"])
    out: dict = {"photos": n, "optimize": {"mean_s": t_opt, "mean_loss": l_opt}, "train_s": train_s}
    for v in variants:
        t, loss = mean(lambda r: r[v]["s"]), mean(lambda r: r[v]["loss"])
        per = sorted(r[v]["loss"] / r["optimize"]["loss"] for r in rows)
        out[v] = {"mean_s": t, "mean_loss": loss, "loss_ratio": loss / l_opt,
                  "per_photo_ratio_mean": sum(per) / n, "per_photo_ratio_max": per[-1],
                  "break_even": train_s / (t_opt - t) if t < t_opt else None,
                  "totals": {N: {"optimize_s": N * t_opt, "network_s": train_s + N * t,
                                 "ratio": (train_s + N * t) / (N * t_opt)} for N in (16, 32, 128)}}
    return out


def bench_style(a, settings: Settings, style: Path, photos: list[Path], variants: list[str], res: dict) -> None:
    torch.manual_seed(0)
    engine = file_engine(settings.replace(refine_steps=a.refine_steps) if a.refine_steps is not None else settings)
    key = style.stem
    job = file_job(engine, photos[0], style, key=key)  # its photo unused: train takes its own
    train_on = [to_tensor(decode.load_rgb(p), a.size) for p in even_sample(photos, network.TRAIN_PHOTOS)]
    load0, t = os.getloadavg()[0], time.perf_counter()
    state = engine.train(job, train_on, None, engine.settings.network_steps)
    train_s = time.perf_counter() - t
    engine.load_model(job, state)
    r = res["styles"][style.name] = {"train_s": train_s, "train_steps": engine.settings.network_steps,
                                     "train_photos": len(train_on), "train_load": [load0, os.getloadavg()[0]],
                                     "rows": []}
    print(f"{style.name}: trained {engine.settings.network_steps} steps in {train_s:.0f}s", flush=True)
    for p in photos[: a.limit or None]:  # the network trained on all of them, as a run's would
        row, images = one_photo(engine, style, key, p, a.size, variants)
        r["rows"].append(row)
        r["summary"] = summary(r["rows"], variants, train_s)
        a.json.write_text(json.dumps(res, indent=1))
        folder = a.work / style.stem
        for name, img in images.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            to_pil(img).save(folder / name / f"{p.stem}.png")
        print(p.name, f"load {row['load']:.1f}", " ".join(
            f"{k}:{row[k]['s']:.1f}s/{row[k]['loss']:.3g}" for k in ["optimize", *variants]), flush=True)


def sheet(work: Path, style: str, names: list[str], variant: str, cell: int, out: Path) -> None:
    """photo | optimize | network | network + `variant`, one row a photo, from the saved images."""
    cols = ["photo", "optimize", "0+0", variant]
    im = Image.new("RGB", (len(cols) * cell, len(names) * cell), "white")
    for i, n in enumerate(names):
        for j, col in enumerate(cols):
            tile = Image.open(work / style / col / f"{n}.png").convert("RGB")
            tile.thumbnail((cell, cell))
            im.paste(tile, (j * cell + (cell - tile.width) // 2, i * cell + (cell - tile.height) // 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, quality=85)
    print("sheet", out, out.stat().st_size, "bytes")


def gpu_only(a, settings: Settings, style: Path, photos: list[Path]) -> None:
    """A training step and a forward pass at 512 and 1024 px."""
    res: dict = {}
    for px in (512, 1024):
        e = file_engine(settings.replace(size=px))
        dev = e.device
        job = file_job(e, photos[0], style, key="bench")
        tens = [to_tensor(decode.load_rgb(p), px) for p in photos[:8]]
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        st = e.train(job, tens, None, 3)
        sync()
        t = time.perf_counter()
        st = e.train(job, tens, st, 23)
        sync()
        res[f"train_step_s_{px}"] = (time.perf_counter() - t) / 20
        e.load_model(job, st)
        x = tens[0].to(dev)
        network.apply(e.model("bench"), x)
        sync()
        t = time.perf_counter()
        for _ in range(10):
            network.apply(e.model("bench"), x)
        sync()
        res[f"forward_s_{px}"] = (time.perf_counter() - t) / 10
        print(px, "train step", f"{res[f'train_step_s_{px}']:.3f}s", "forward", f"{res[f'forward_s_{px}']:.4f}s")
    a.json.write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=Path, help="every image in this folder (default: the bundled and shared ones)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--styles", default="starry_night.jpg", help="comma-separated, in data/styles")
    ap.add_argument("--refine", default="0+0,R,0+20,20+20,40+10",
                    help="variants: H+F (half-size then full-size steps) or R (the engine's refine_config)")
    ap.add_argument("--refine-steps", type=int, help="refine_steps for R (default: the setting's default)")
    ap.add_argument("--network-steps", type=int)
    ap.add_argument("--limit", type=int, default=0, help="make only the first N photos (training uses all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_network"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/network-results.json"))
    ap.add_argument("--sheet", type=Path, default=Path("docs/network_sheet.jpg"))
    ap.add_argument("--sheet-photos", default="", help="photo stems for the sheet (default: the first 4)")
    ap.add_argument("--sheet-variant", default="R")
    ap.add_argument("--sheet-only", action="store_true", help="the sheet again from --work's images")
    ap.add_argument("--gpu-only", action="store_true", help="time a training step and a forward pass at 512, 1024 px")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    photos = find_photos(a.photos)
    styles = [ROOT / "data/styles" / s for s in a.styles.split(",")]
    settings = Settings(content=a.work, styles=styles[0].parent, size=a.size, device=a.device)
    if a.network_steps:
        settings = settings.replace(network_steps=a.network_steps)
    names = a.sheet_photos.split(",") if a.sheet_photos else [p.stem for p in photos[:4]]
    if a.gpu_only:
        return gpu_only(a, settings, styles[0], photos)
    if not a.sheet_only:
        variants = a.refine.split(",")
        res: dict = {"device": a.device, "size": a.size, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv[1:],
                     "variants": variants, "styles": {}}
        for style in styles:
            bench_style(a, settings, style, photos, variants, res)
            s = res["styles"][style.name]["summary"]
            print(json.dumps({v: {k: s[v][k] for k in ("mean_s", "loss_ratio", "break_even")} for v in variants}
                             | {"optimize": s["optimize"], "train_s": s["train_s"]}, indent=1), flush=True)
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        a.json.write_text(json.dumps(res, indent=1))
    sheet(a.work, styles[0].stem, names, a.sheet_variant, a.size, a.sheet)


if __name__ == "__main__":
    main()
