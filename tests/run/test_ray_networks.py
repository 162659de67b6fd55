"""`nst-batch run --ray` with learned per-style networks: the driver trains each style's network on one actor,
a chunk a call, under the same claim file a local worker takes, and writes the checkpoints; the actors make
the pairs with it. Drivers are CLI subprocesses on this module's Ray cluster (2 CPUs), as in test_ray.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import ROOT, make_image
from nst_batch.batch.ledger import Ledger
from test_network_workers import _LAUNCH, _folder, _start
from test_ray import descendants_titled, popen, wait_for

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them


def _driver(manifest: Path, address: str, workers: int = 2, checkpoint_s: float | None = None):
    """The Ray driver as a subprocess; checkpoint_s: with the checkpoint interval shortened (_LAUNCH)."""
    args = ["run", str(manifest), "--ray", address, "--ray-workers", str(workers)]
    if checkpoint_s is None:
        return popen(args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-c", _LAUNCH, str(checkpoint_s), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout: float = 240) -> str:
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, text
    return text


def _trained_once(text: str, styles: list[str]) -> None:
    for style in styles:
        assert len(re.findall(rf"{re.escape(style)}: training its network on", text)) == 1, text


def test_two_actors_train_each_style_once_and_make_every_pair_with_it(tmp_path, ray_address):
    manifest = _folder(tmp_path, photos=3, styles=2, network_steps=12)
    text = _finish(_driver(manifest, ray_address))
    _trained_once(text, ["s0.png", "s1.png"])
    out = tmp_path / "out"
    with Ledger(out) as led:
        rows, models, methods = led.rows(), led.models(), led.methods()
    assert len(rows) == 6 and all(r.state == "done" and r.attempts == 1 for r in rows)
    assert set(methods.values()) == {"network"}
    assert all(r.steps == 3 for r in rows)  # refine_steps of L-BFGS on the network's output
    assert {st: m["step"] for st, m in models.items()} == {"s0.png": 12, "s1.png": 12}
    assert sorted(p.name for p in (out / "models").iterdir()) == ["s0.png.pt", "s1.png.pt"]  # no claim left
    for st in ("s0.png", "s1.png"):
        steps = [pt[0] for pt in torch.load(out / "models" / f"{st}.pt", weights_only=True)["curve"]]
        assert steps == sorted(set(steps)) and steps[-1] == 12  # each step trained once
    assert all((out / r.output).is_file() for r in rows)
    assert "\n(training),s1.png,12," in (out / "losses.csv").read_text()  # the curve, in the loss log as locally


# The CLI with `auto`'s break-even on the CPU set to argv[1] (None: the shipped rule, from the measured figures).
_AUTO = ("import sys; from nst_batch.batch import methods; n = sys.argv.pop(1); "
         "methods.BREAK_EVEN['cpu'] = None if n == 'None' else int(n); "
         "from nst_batch.cli import app; app(prog_name='nst-batch')")


def test_auto_trains_a_network_where_a_style_reaches_the_break_even(tmp_path, ray_address):
    """With a break-even of 3, a style of 3 pending photos gets a network under --ray as locally; with none
    (a network path measured past 1.10x optimize's loss), it is optimised."""
    for even, method in ((3, "network"), (None, "optimize")):
        manifest = _folder(tmp_path / method, photos=3, styles=1, network_steps=12)
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "method": "auto"}))
        args = ["run", str(manifest), "--ray", ray_address, "--ray-workers", "2"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        text = _finish(subprocess.Popen([sys.executable, "-c", _AUTO, str(even), *args], cwd=ROOT, env=env,
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        assert f"s0.png: method {method} (3 photo(s) pending; auto trains " in text, text
        with Ledger(tmp_path / method / "out") as led:
            assert set(led.methods().values()) == {method} and led.counts()["done"] == 3
        if method == "network":
            _trained_once(text, ["s0.png"])


def test_a_network_a_local_run_trained_is_used_not_trained_again(tmp_path, ray_address):
    from nst_batch.config import manifest as mf
    from nst_batch.run import local
    from nst_batch.run.progress import Display

    manifest = _folder(tmp_path, photos=2, styles=1, network_steps=8)
    assert local.run(mf.load(manifest), Display(Console(quiet=True))).made == 2
    model = tmp_path / "out" / "models" / "s0.png.pt"
    before = model.read_bytes()
    make_image(tmp_path / "content" / "p9.png", 40, 32, 9)  # a photo added since: made by that network
    text = _finish(_driver(manifest, ray_address, 1))
    assert "training its network" not in text, text
    assert model.read_bytes() == before
    with Ledger(tmp_path / "out") as led:
        assert len(led.rows()) == 3 and led.counts()["done"] == 3
        assert set(led.methods().values()) == {"network"}
        assert led.models()["s0.png"]["step"] == 8


def test_a_killed_driver_s_training_goes_on_from_its_checkpoint(tmp_path, ray_address):
    manifest = _folder(tmp_path, photos=2, styles=1, network_steps=40)
    model = tmp_path / "out" / "models" / "s0.png.pt"
    proc = _driver(manifest, ray_address, 1, checkpoint_s=0.2)
    try:
        deadline = time.monotonic() + 120
        while not model.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no handler runs: the claim file stays behind, held by a dead PID
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    step = torch.load(model, weights_only=True)["state"]["step"]
    assert 0 < step < 40
    assert (model.parent / "s0.png.pt.claim").is_file()
    text = _finish(_driver(manifest, ray_address, 1))
    assert f"step {step} of 40 (resumed from its checkpoint)" in text, text
    ck = torch.load(model, weights_only=True)
    steps = [pt[0] for pt in ck["curve"]]
    assert ck["state"]["step"] == 40 and steps == sorted(set(steps)) and steps[-1] == 40  # no step twice
    with Ledger(tmp_path / "out") as led:
        assert led.models()["s0.png"]["step"] == 40 and led.counts()["done"] == 2
        assert set(led.methods().values()) == {"network"}
    assert not (model.parent / "s0.png.pt.claim").exists()


def test_an_actor_killed_mid_training_is_followed_by_another_from_the_checkpoint(tmp_path, ray_address):
    manifest = _folder(tmp_path, photos=2, styles=1, network_steps=40)
    model = tmp_path / "out" / "models" / "s0.png.pt"
    proc = _driver(manifest, ray_address, checkpoint_s=0.2)
    try:
        wait_for(model.is_file, 120, "a checkpoint", proc)
        os.kill(wait_for(lambda: descendants_titled(b"ray::EngineWorker.train"), 60, "an actor training", proc)[0],
                signal.SIGKILL)
        text = _finish(proc)
    finally:
        proc.kill()
    assert re.search(r"s0\.png: training its network on 2 photo\(s\), step [1-9]\d* of 40 \(resumed from its checkpoint\)",
                     text), text
    ck = torch.load(model, weights_only=True)
    steps = [pt[0] for pt in ck["curve"]]
    assert ck["state"]["step"] == 40 and steps == sorted(set(steps)) and steps[-1] == 40
    with Ledger(tmp_path / "out") as led:
        rows = led.rows()
    assert len(rows) == 2 and all(r.state == "done" and r.attempts == 1 for r in rows)  # waiting cost no attempt
    assert not (model.parent / "s0.png.pt.claim").exists()


def test_a_training_that_fails_fails_its_style_s_network_pairs_as_training(tmp_path, ray_address):
    manifest = _folder(tmp_path, photos=2, styles=1, network_steps=8)
    for p in (tmp_path / "content").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)  # nothing the network could train on
    proc = _driver(manifest, ray_address, 1)
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, text
    with Ledger(tmp_path / "out") as led:
        rows = led.rows()
        assert led.models() == {}
    assert [(r.state, r.error_kind) for r in rows] == [("failed", "training")] * 2, text
    assert "no photo of s0.png could be decoded to train its network on" in rows[0].error_message
    assert list((tmp_path / "out" / "models").iterdir()) == []  # no checkpoint, the claim let go


def test_a_ray_driver_and_a_local_worker_on_one_out_train_each_network_once(tmp_path, ray_address):
    manifest = _folder(tmp_path, photos=3, styles=2, network_steps=30)
    ray_driver = _driver(manifest, ray_address, 1)
    # The local worker starts while the driver trains a network: it trains the other style's, or waits.
    wait_for(lambda: list((tmp_path / "out" / "models").glob("*.claim")), 120, "a training", ray_driver)
    texts = [_finish(p) for p in (ray_driver, _start(manifest))]
    _trained_once("".join(texts), ["s0.png", "s1.png"])
    with Ledger(tmp_path / "out") as led:
        rows, models, methods = led.rows(), led.models(), led.methods()
    assert len(rows) == 6 and all(r.state == "done" and r.attempts == 1 for r in rows)  # waiting cost no attempt
    assert set(methods.values()) == {"network"}
    assert {st: m["step"] for st, m in models.items()} == {"s0.png": 30, "s1.png": 30}
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["s0.png.pt", "s1.png.pt"]
