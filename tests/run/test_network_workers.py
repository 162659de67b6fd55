"""Training a style's network is claimed like a pair: two processes on one OUT train each network once, and a
trainer killed with SIGKILL is continued from its checkpoint by the next run, its steps counted once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image
from nst_batch.batch.ledger import Ledger

pytestmark = pytest.mark.slow  # the CLI in subprocesses

# The CLI with the checkpoint interval shortened: what a test cannot set from a manifest.
_LAUNCH = ("import sys; from nst_batch.run import training; training.CHECKPOINT_S = float(sys.argv.pop(1)); "
           "from nst_batch.cli import app; app(prog_name='nst-batch')")


def _folder(tmp_path: Path, photos: int, styles: int, network_steps: int) -> Path:
    for i in range(photos):
        make_image(tmp_path / "content" / f"p{i}.png", 40, 32, i)
    (tmp_path / "styles").mkdir()
    for k in range(styles):
        # Stripes, unlike the smooth photos: refining a network's image then lowers the loss (no no_progress).
        stripes = np.zeros((40, 40, 3), np.uint8)
        stripes[::4] = (250, 30 + 100 * k, 30)
        stripes[1::4] = (20, 20, 200)
        Image.fromarray(stripes).save(tmp_path / "styles" / f"s{k}.png")
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(json.dumps({
        "content": str(tmp_path / "content"), "styles": str(tmp_path / "styles"), "out": str(tmp_path / "out"),
        "size": 32, "steps": 4, "log_every": 2, "scales": [1.0], "device": "cpu", "lease_s": 3,
        "layers": {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]},
        "method": "network", "network_steps": network_steps, "refine_steps": 3}))
    return manifest


def _start(manifest: Path, checkpoint_s: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    head = ["-m", "nst_batch.cli"] if checkpoint_s is None else ["-c", _LAUNCH, str(checkpoint_s)]
    return subprocess.Popen([sys.executable, *head, "run", str(manifest)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_processes_on_one_out_train_each_network_once(tmp_path):
    manifest = _folder(tmp_path, photos=4, styles=2, network_steps=20)
    procs = [_start(manifest), _start(manifest)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "".join(outs)
    for style in ("s0.png", "s1.png"):
        assert len(re.findall(rf"{re.escape(style)}: training its network on", both)) == 1, both
    out = tmp_path / "out"
    with Ledger(out) as led:
        rows = led.rows()
        models = led.models()
    assert len(rows) == 8 and all(r.state == "done" and r.attempts == 1 for r in rows)
    assert {st: m["step"] for st, m in models.items()} == {"s0.png": 20, "s1.png": 20}
    assert sorted(p.name for p in (out / "models").iterdir()) == ["s0.png.pt", "s1.png.pt"]  # no claim left


def test_a_trainer_killed_mid_training_is_continued_from_its_checkpoint(tmp_path):
    manifest = _folder(tmp_path, photos=2, styles=1, network_steps=60)
    model = tmp_path / "out" / "models" / "s0.png.pt"
    p = _start(manifest, checkpoint_s=0.3)
    deadline = time.monotonic() + 300
    while not model.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()  # SIGKILL: no handler runs, the claim file stays behind
    p.communicate(timeout=60)
    step = torch.load(model, weights_only=True)["state"]["step"]
    assert 0 < step < 60
    assert (model.parent / "s0.png.pt.claim").is_file()
    again = _start(manifest)
    text = again.communicate(timeout=400)[0]
    assert again.returncode == 0, text
    assert f"step {step} of 60 (resumed from its checkpoint)" in text, text
    ck = torch.load(model, weights_only=True)
    assert ck["state"]["step"] == 60
    steps = [pt[0] for pt in ck["curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # every step once: none trained twice
    with Ledger(tmp_path / "out") as led:
        assert led.models()["s0.png"]["step"] == 60 and led.counts()["done"] == 2
