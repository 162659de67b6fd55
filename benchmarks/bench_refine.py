#!/usr/bin/env python
"""How many refine steps a network's output needs: the engine's refinement at several `refine_steps`, from
the network bench_network.py trains (same seed, same photos), scored against the `optimize` images that
bench_network.py saved in /tmp/bench_network/<style>/optimize/ (no re-optimising; both 8-bit, as a run
writes them). Run bench_network.py first, then, one process a style:

    python3 benchmarks/bench_refine.py starry_night.jpg 50,70      # prints a line a photo, then the means
"""
import json, os, sys, time
from pathlib import Path
import numpy as np
import torch
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
import bench_network as bn
from nst_batch.config.manifest import Settings
from nst_batch.files import decode
from nst_batch.files.decode import to_tensor
from nst_batch.run.jobs import file_engine, file_job
from nst_batch.core import network
from nst_batch.batch.methods import even_sample
from PIL import Image

style = ROOT / "data" / "styles" / sys.argv[1]
steps = [int(x) for x in sys.argv[2].split(",")]
photos = bn.find_photos(Path("/tmp/realphotos"))
settings = Settings(content=Path("/tmp/bench_network"), styles=style.parent, size=128, device="cpu")
torch.manual_seed(0)
engines = {n: file_engine(settings.replace(refine_steps=n)) for n in steps}
e0 = engines[steps[0]]
key = style.stem
job = file_job(e0, photos[0], style, key=key)
train_on = [to_tensor(decode.load_rgb(p), 128) for p in even_sample(photos, network.TRAIN_PHOTOS)]
t = time.perf_counter()
state = e0.train(job, train_on, None, e0.settings.network_steps)
train_s = time.perf_counter() - t
for e in engines.values():
    e.load_model(file_job(e, photos[0], style, key=key), state)
print(f"trained in {train_s:.0f}s", flush=True)
q = lambda img: torch.round(img.clamp(0, 1) * 255) / 255
rows = []
for p in photos:
    c = to_tensor(decode.load_rgb(p), 128)
    score = bn.Scorer(e0, key)
    saved = Image.open(f"/tmp/bench_network/{style.stem}/optimize/{p.stem}.png").convert("RGB")
    opt = torch.from_numpy(np.array(saved)).permute(2, 0, 1)[None].float() / 255
    row = {"photo": p.name, "optimize": score(c, opt), "load": os.getloadavg()[0]}
    for n, e in engines.items():
        t = time.perf_counter()
        m = e.make([file_job(e, p, style, key=key, photo=c, method="network")])[0]
        row[f"R{n}"] = {"s": time.perf_counter() - t, "loss": score(c, q(m.image)), "steps": m.steps}
    rows.append(row)
    print(p.name, " ".join(f"R{n}: {row[f'R{n}']['s']:.1f}s {row[f'R{n}']['loss']/row['optimize']:.3f}x" for n in steps), flush=True)
    Path(f"/tmp/bench_refine_{style.stem}.json").write_text(json.dumps({"train_s": train_s, "rows": rows}, indent=1))
for n in steps:
    per = [r[f"R{n}"]["loss"] / r["optimize"] for r in rows]
    print(f"R{n}: mean ratio {sum(per)/len(per):.4f} max {max(per):.3f}, ratio of means "
          f"{sum(r[f'R{n}']['loss'] for r in rows)/sum(r['optimize'] for r in rows):.4f}, mean s {sum(r[f'R{n}']['s'] for r in rows)/len(rows):.1f}")
