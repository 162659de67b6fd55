#!/usr/bin/env python
"""Learned per-style networks vs optimisation, one style, on this machine, by hand:

    python benchmarks/bench_network.py --size 128 --train-steps 300      # from the repository root
    python benchmarks/bench_network.py --device cuda --gpu-only          # per-step GPU figures (gpu.sh)

Photos: 128 made from data/content and ../shared/images/content by random crops (60-100% of the side)
and horizontal flips, saved at 2x the size. Collections N = 8, 32, 128 are the first N of them.

- `optimize` (today's defaults, gatys): run on a sample of 8 photos; its total for N is N x the mean
  time a pair (pairs are independent: linear).
- `network`: trained ONCE, on the even sample of the 128-photo collection the runner would train on
  (training.even_sample, network.TRAIN_PHOTOS), with checkpoints at --eval-at steps; its cost does not
  depend on N (steps x batch of crops), so each N's total is training + N x (forward pass + refine).
- network + refine K for K in 0, 20, 50 on the same 8 photos.
Every final image is scored independently: the gatys objective, fp32, at full size (one evaluator).
Writes a JSON of everything and a contact sheet (photo | optimize | network | network + refine 50).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_batch.files import decode# noqa: E402
from nst_batch.core import losses, network
from nst_batch.run import training
from nst_batch.core.engine import Engine  # noqa: E402
from nst_batch.files.decode import to_tensor  # noqa: E402
from nst_batch.files.encode import to_pil  # noqa: E402
from nst_batch.run.jobs import file_engine, file_job  # noqa: E402
from nst_batch.config.manifest import Settings  # noqa: E402
from nst_batch.core.pyramid import stylize  # noqa: E402


def make_photos(folder: Path, n: int, size: int) -> list[Path]:
    srcs = sorted(p for d in (ROOT / "data/content", ROOT.parent / "shared/images/content") if d.is_dir()
                  for p in d.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = decode.load_rgb(srcs[i % len(srcs)])
        f = rng.uniform(0.6, 1.0)
        w, h = int(im.width * f), int(im.height * f)
        x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        im = im.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        im.thumbnail((2 * size, 2 * size))
        p = folder / f"p{i:03d}.png"
        im.save(p)
        out.append(p)
    return out


class Scorer:
    """The gatys objective of a final image, fp32, at its own size: one judge for every method."""

    def __init__(self, engine: Engine, style: Path):
        self.e, self.style = engine, style

    def __call__(self, photo: torch.Tensor, img: torch.Tensor) -> float:
        e = self.e
        obj = e.objective
        with torch.no_grad():
            c = losses.content_targets(obj, e.net(photo, frozenset(obj.content_layers)))
            e.style_pixels.add("bench", self.style)
            s = e.style_targets("bench", e.settings.style_size or e.settings.size)
            return float(losses.compute(obj, e.net(img.clamp(0, 1), obj.layers), img, c, s).total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--eval-at", default="150,300")
    ap.add_argument("--sample", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_network"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/network-results.json"))
    ap.add_argument("--sheet", type=Path, default=Path("docs/network_sheet.jpg"))
    ap.add_argument("--gpu-only", action="store_true", help="time a training step and a forward pass at 512, 1024 px")
    a = ap.parse_args()
    style = ROOT / "data/styles/starry_night.jpg"
    settings = Settings(content=a.work, styles=style.parent, size=a.size, device=a.device)
    engine = file_engine(settings)
    dev = engine.device
    res: dict = {"device": str(dev), "size": a.size, "threads": torch.get_num_threads()}
    job = file_job(engine, style, style, content="x", key="bench")  # its photo unused: train takes its own

    if a.gpu_only:
        photos = make_photos(a.work, 8, 1024)
        for px in (512, 1024):
            e = file_engine(settings.replace(size=px), dev)
            e.style_pixels.add("bench", style)
            ims = [decode.load_rgb(p) for p in photos]
            tens_px = [to_tensor(im, px) for im in ims]
            st = e.train(job, tens_px, None, 3)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t = time.perf_counter()
            st = e.train(job, tens_px, st, 23)
            sync()
            step = (time.perf_counter() - t) / 20
            e.load_model(job, st)
            x = to_tensor(ims[0], px).to(dev)
            network.apply(e.model("bench"), x)
            sync()
            t = time.perf_counter()
            for _ in range(10):
                network.apply(e.model("bench"), x)
            sync()
            res[f"train_step_s_{px}"] = step
            res[f"forward_s_{px}"] = (time.perf_counter() - t) / 10
            print(px, "train step", f"{step:.3f}s", "forward", f"{res[f'forward_s_{px}']:.4f}s", flush=True)
        a.json.write_text(json.dumps(res, indent=1))
        return

    photos = make_photos(a.work, 128, a.size)
    sample = photos[:: len(photos) // a.sample][: a.sample]
    score = Scorer(engine, style)
    tens = {p: to_tensor(decode.load_rgb(p), a.size).to(dev) for p in sample}

    # -- optimize, today's defaults
    opt_t, opt_l, opt_img = [], [], {}
    for p in sample:
        t = time.perf_counter()
        m = engine.make([file_job(engine, p, style, key="bench")])[0]
        opt_t.append(time.perf_counter() - t)
        opt_l.append(score(tens[p], m.image.to(dev)))
        opt_img[p] = m.image
        print(f"optimize {p.name}: {opt_t[-1]:.1f}s loss {opt_l[-1]:.4g} (photo itself {score(tens[p], tens[p]):.4g})",
              flush=True)
    res["optimize"] = {"mean_s": sum(opt_t) / len(opt_t), "mean_loss": sum(opt_l) / len(opt_l),
                       "photo_loss": sum(score(tens[p], tens[p]) for p in sample) / len(sample)}

    # -- network, trained once on the runner's sample of the 128-photo collection
    train_on = [to_tensor(decode.load_rgb(p), a.size) for p in training.even_sample(photos, network.TRAIN_PHOTOS)]
    evals = sorted(int(x) for x in a.eval_at.split(","))
    state, trained_s, curve = None, 0.0, []
    res["network"] = {}
    for until in evals:
        t = time.perf_counter()
        state = engine.train(job, train_on, state, until,
                             on_loss=lambda step, terms: curve.append((step, float(terms.total.mean()))))
        trained_s += time.perf_counter() - t
        engine.load_model(job, state)
        row = {"train_s": trained_s, "train_steps": until}
        for k in (0, 20, 50):
            cfg = dataclasses.replace(engine.optim, steps=k, scales=(1.0,))
            ts, ls = [], []
            for p in sample:
                t = time.perf_counter()
                c = tens[p]
                style_for = lambda h, w: engine.style_targets("bench", a.size)  # noqa: E731
                r = stylize(engine.net, engine.objective, c, style_for, cfg, init=network.apply(engine.model("bench"), c))
                ts.append(time.perf_counter() - t)
                ls.append(score(c, r.images.to(dev)))
                if until == evals[-1] and k in (0, 50):
                    opt_img.setdefault(("net", k, p), r.images)
            row[f"refine_{k}"] = {"mean_s": sum(ts) / len(ts), "mean_loss": sum(ls) / len(ls)}
            print(f"network {until} steps ({trained_s:.0f}s) + refine {k}: {row[f'refine_{k}']}", flush=True)
        res["network"][str(until)] = row
    res["curve"] = curve[:: max(1, len(curve) // 60)]

    # -- totals per N, and the break-even
    o = res["optimize"]
    last = res["network"][str(evals[-1])]
    res["totals"] = {}
    for n in (8, 32, 128):
        res["totals"][n] = {"optimize_s": n * o["mean_s"],
                            **{f"network_refine_{k}_s": last["train_s"] + n * last[f"refine_{k}"]["mean_s"] for k in (0, 20, 50)}}
    res["break_even"] = {}
    for k in (0, 20, 50):
        per = last[f"refine_{k}"]["mean_s"]
        ratio = last[f"refine_{k}"]["mean_loss"] / o["mean_loss"]
        res["break_even"][k] = {"loss_ratio": ratio,
                                "n": (last["train_s"] / (o["mean_s"] - per)) if per < o["mean_s"] else None}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps({"totals": res["totals"], "break_even": res["break_even"]}, indent=1))

    # -- the contact sheet: photo | optimize | network | network + refine 50, 4 photos
    rows = sample[:4]
    cell = a.size
    sheet = Image.new("RGB", (4 * cell, len(rows) * cell), "white")
    for i, p in enumerate(rows):
        for j, im in enumerate([to_pil(tens[p].cpu()), to_pil(opt_img[p]), to_pil(opt_img[("net", 0, p)]),
                                to_pil(opt_img[("net", 50, p)])]):
            im.thumbnail((cell, cell))
            sheet.paste(im, (j * cell + (cell - im.width) // 2, i * cell + (cell - im.height) // 2))
    a.sheet.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.sheet, quality=85)
    print("sheet", a.sheet, a.sheet.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
