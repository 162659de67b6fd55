"""Learned per-style networks: the transformer, its training, resuming it, and the methods in a run."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst_batch.files import decode
from nst_batch.batch.methods import BREAK_EVEN, assign
from nst_batch.run import lifecycle, local, training
from nst_batch.core import network
from nst_batch.report import build as report
from nst_batch.files.decode import to_tensor
from nst_batch.batch.ledger import Ledger
from nst_batch.run.lifecycle import Interrupted
from nst_batch.config.manifest import Settings
from nst_batch.batch.plan import make_plan
from nst_batch.run.progress import Display
from nst_batch.batch.shards import Shard
from rich.console import Console

from conftest import cli, engine_of, make_image, path_job

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a loaded machine two threads spin-wait: 10
    training steps at 32 px took 16 s of CPU with two threads against 1 s with one (load 10 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One engine (VGG loaded once) for the file: the conftest photos and a style at 32 px, refine_steps 0."""
    root = tmp_path_factory.mktemp("tiny")
    content, styles = root / "content", root / "styles"
    make_image(content / "wide.png", 64, 40, 1)
    make_image(content / "tall.jpg", 36, 60, 2)
    make_image(content / "square.png", 48, 48, 3)
    make_image(styles / "s1.png", 64, 64, 10)
    s = Settings(content=content, styles=styles, out=root / "out", size=32, steps=4, log_every=2, scales=(1.0,),
                 device="cpu", layers=LAYERS, refine_steps=0)
    engine = engine_of(s)
    photos = [to_tensor(decode.load_rgb(p), s.size) for p in sorted(content.iterdir())]
    engine.style_pixels.add("s1", styles / "s1.png")
    return engine, photos, engine.style_targets("s1", s.size)


def test_training_lowers_the_objective_and_a_resumed_run_equals_an_uninterrupted_one(tiny):
    engine, photos, style = tiny
    args = (engine.net, engine.objective, photos, style)
    # Progress is measured on fixed crops: one step's loss is on crops of its own, and they differ up to
    # 6x (a flip turns the stripes), so the per-step losses swing (1.6 -> 2.9 -> 0.5) while it learns.
    held = network.held_crops(photos, 8, seed=123)
    state = network.new_state(0, engine.device)
    before = network.held_objective(state.net, *args[:2], held, style)
    seen: list[float] = []
    # "Killed" at step 37: only the checkpoint survives (saved and loaded as the runner does).
    network.train_steps(state, *args, 40, on_loss=lambda step, t: seen.append(float(t.total.mean())),
                        should_pause=lambda st: st.step == 37)
    assert state.step == 37 and len(seen) == 37
    buf = io.BytesIO()
    torch.save(network.state_dict(state), buf)
    network.train_steps(state, *args, 40)  # on in memory: what an uninterrupted run does
    buf.seek(0)
    resumed = network.train_steps(network.from_state_dict(torch.load(buf, weights_only=True), engine.device),
                                  *args, 40)
    assert state.step == resumed.step == 40
    for (k, a), b in zip(state.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(map(math.isfinite, seen))
    after = network.held_objective(state.net, *args[:2], held, style)
    assert after < 0.85 * before, (before, after)


def test_a_training_curve_row_is_the_mean_of_its_window():
    w = training.WindowMean(every=3, last=7)
    got = [w.add(step, float(step), 2.0 * step, 0.0) for step in range(1, 8)]
    assert got == [None, None, (2.0, 4.0, 0.0), None, None, (5.0, 10.0, 0.0), (7.0, 14.0, 0.0)]


def test_the_network_keeps_any_size_and_stays_in_range():
    net = network.TransformerNet()
    for h, w in [(32, 32), (33, 47), (41, 30), (7, 9)]:
        y = network.apply(net, torch.rand(2, 3, h, w))
        assert y.shape == (2, 3, h, w) and 0 <= float(y.min()) and float(y.max()) <= 1
    x = torch.rand(1, 3, 40, 40)
    assert float((network.apply(net, x) - x).abs().mean()) < 0.1  # untrained: near the photo itself


# -- the methods in a run ------------------------------------------------------------------------


def _plan_settings(tmp_path: Path, photos: int, **kw) -> Settings:
    for i in range(photos):
        make_image(tmp_path / "content" / f"p{i}.png", 40, 32, i)
    # Stripes, unlike the smooth photos: the photo itself scores far from the style, as a real painting does.
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = (250, 30, 30)
    stripes[1::4] = (20, 20, 200)
    (tmp_path / "styles").mkdir(parents=True, exist_ok=True)
    Image.fromarray(stripes).save(tmp_path / "styles" / "s1.png")
    return Settings(content=tmp_path / "content", styles=tmp_path / "styles", out=tmp_path / "out", size=32,
                    steps=4, log_every=2, scales=(1.0,), device="cpu", layers=LAYERS, lease_s=30, **kw)


def test_auto_chooses_by_pending_count_and_a_changed_objective_changes_the_model(tmp_path, monkeypatch):
    s = _plan_settings(tmp_path, 3)
    plan = make_plan(s)
    monkeypatch.setitem(BREAK_EVEN, "cpu", 3)
    net_plan, styles, methods = assign(plan, s, {}, "cpu")
    assert styles["s1.png"].method == "network" and set(methods.values()) == {"network"}
    assert all(a.recipe != b.recipe for a, b in zip(plan, net_plan))  # a network pair has a recipe of its own
    # Two of three made already (one each way): one pending, under the break-even: optimize, and the
    # done pairs keep the recipes they were made with.
    done = {(plan[0].content, "s1.png"): plan[0].recipe, (plan[1].content, "s1.png"): net_plan[1].recipe}
    again, styles2, methods2 = assign(plan, s, done, "cpu")
    assert styles2["s1.png"].method == "optimize" and styles2["s1.png"].pending == 1
    assert [p.recipe for p in again] == [plan[0].recipe, net_plan[1].recipe, plan[2].recipe]
    assert [methods2[(p.content, p.style)] for p in plan] == ["optimize", "network", "optimize"]
    assert assign(plan, s.replace(method="optimize"), {}, "cpu")[1]["s1.png"].method == "optimize"
    # The objective, the style or network_steps change the model's recipe, and so its pairs'.
    for changed in (s.replace(style_weight=5.0), s.replace(network_steps=7), s.replace(per_style=(("s1.png", (("tv_weight", 1.0),)),))):
        other = assign(make_plan(changed), changed, {}, "cpu")
        assert other[1]["s1.png"].model_recipe != styles["s1.png"].model_recipe
        assert all(a.recipe != b.recipe for a, b in zip(net_plan, other[0]))
    # The refinement's settings and the file format redo pairs (their own recipes) but keep the model.
    for kept in (s.replace(steps=9), s.replace(format="jpg")):
        assert assign(make_plan(kept), kept, {}, "cpu")[1]["s1.png"].model_recipe == styles["s1.png"].model_recipe
    # The photo set does not: a photo added or removed keeps the model, and every other pair's recipe.
    make_image(tmp_path / "content" / "p9.png", 40, 32, 9)
    grown, styles3, _ = assign(make_plan(s), s, {}, "cpu")
    assert styles3["s1.png"].model_recipe == styles["s1.png"].model_recipe
    assert {p.recipe for p in net_plan} < {p.recipe for p in grown}
    stripes = Image.open(s.styles / "s1.png")
    stripes.transpose(Image.Transpose.ROTATE_90).save(s.styles / "s1.png")  # another painting, same name
    assert assign(make_plan(s), s, {}, "cpu")[1]["s1.png"].model_recipe != styles["s1.png"].model_recipe


def test_a_network_run_trains_checkpoints_resumes_after_a_kill_and_refines(tmp_path, monkeypatch, tiny):
    s = _plan_settings(tmp_path, 2, method="network", network_steps=4, refine_steps=3)
    monkeypatch.setattr(training, "CHECKPOINT_S", 0.0)  # a checkpoint after every step
    starts: list[int] = []
    real_train, real_save = network.train_steps, training.Trainer._save

    def spy_train(state, *a, **kw):
        starts.append(state.step)
        return real_train(state, *a, **kw)

    def killed_after_two(self, path, sm, state, kept, rows, photos):
        ck = real_save(self, path, sm, state, kept, rows, photos)
        if state["step"] == 2:
            raise Interrupted(15)  # SIGTERM mid-training: what is on disk is the step-2 checkpoint
        return ck

    monkeypatch.setattr(network, "train_steps", spy_train)
    monkeypatch.setattr(training.Trainer, "_save", killed_after_two)
    with pytest.raises(Interrupted):
        local.run(s, Display(Console(quiet=True)))
    with Ledger(s.out) as led:
        assert led.models()["s1.png"]["step"] == 2 and led.counts()["done"] == 0
    assert (s.out / "models" / "s1.png.pt").is_file()
    monkeypatch.setattr(training.Trainer, "_save", real_save)
    killed_at = len(starts)
    result = local.run(s, Display(Console(quiet=True)))
    assert result.made == 2 and result.failed == 0, result.failures
    assert starts[killed_at:] == [2, 3]  # trained on from the step-2 checkpoint (one call a checkpoint), not afresh
    with Ledger(s.out) as led:
        assert led.methods() == {(f"p{i}.png", "s1.png"): "network" for i in range(2)}
        model = led.models()["s1.png"]
        assert model["step"] == 4 and [p[0] for p in json_curve(model["curve"])][-1] == 4
        assert all(r.steps == 3 for r in led.rows())  # refine_steps of L-BFGS each
    log = (s.out / "losses.csv").read_text()
    assert f"{training.TRAINING},s1.png," in log  # the training curve, marked as such
    # Refining lowers the loss: the same trained network with refine_steps 0 scores higher.
    engine = tiny[0]  # the same objective and size, refine_steps 0
    job = path_job(engine, s.content / "p0.png", s.styles / "s1.png", method="network")
    state = torch.load(s.out / "models" / "s1.png.pt", weights_only=True)["state"]
    engine.load_model(job, state)
    raw = engine.make([job])[0]
    with Ledger(s.out) as led:
        refined = next(r for r in led.rows() if r.content == "p0.png")
    assert raw.ok and refined.total_loss < raw.final.total
    # Nothing pending: a run again trains nothing and makes nothing.
    starts.clear()
    assert local.run(s, Display(Console(quiet=True))).made == 0 and starts == []
    # status and the report say which method made each pair, and the report draws the training curve.
    status = cli("status", str(s.out), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["method_counts"] == {"network": 2}
    assert "done by method: network 2" in cli("status", str(s.out)).stdout
    report.write_report(s.out)
    summary = list(csv.DictReader(io.StringIO((s.out / "summary.csv").read_text())))
    assert [r["method"] for r in summary] == ["network", "network"]
    page = (s.out / "styles" / "1.html").read_text()
    assert page.count("network · attempts ") == 2  # (the pair claimed when the kill came is on attempt 2)
    assert "done by method: network 2" in (s.out / "report.html").read_text()
    assert "trained 4 of 4 steps" in page
    assert 'aria-label="training loss over steps"' in page
    assert "4 steps" in page.split('aria-label="training loss over steps"')[1].split("</svg>")[0]


def _trainings(monkeypatch) -> list[tuple[str, str]]:
    """(ledger folder's name, style) of every network the runner trains."""
    trained: list[tuple[str, str]] = []
    real = training.Trainer._train

    def spy(self, job, sm, path, ck):
        trained.append((self.folder.name, job.style))
        return real(self, job, sm, path, ck)

    monkeypatch.setattr(training.Trainer, "_train", spy)
    return trained


def test_two_styles_of_one_image_each_train_and_use_their_own_network(tmp_path, monkeypatch):
    """One painting under two names, per_style setting one apart (a stronger copy): the same style hash,
    two objectives, two models. The engine kept models by style hash, so the second style's pairs were made
    by the first's network and recorded done under a recipe naming a model never trained."""
    s = _plan_settings(tmp_path, 2, method="network", network_steps=2, refine_steps=3)
    shutil.copy(s.styles / "s1.png", s.styles / "s2.png")
    s = s.replace(per_style=(("s2.png", (("style_weight", 30.0),)),))
    trained = _trainings(monkeypatch)
    local.run(s, Display(Console(quiet=True)))
    assert sorted(trained) == [("out", "s1.png"), ("out", "s2.png")]
    with Ledger(s.out) as led:
        models = led.models()
        assert models["s1.png"]["recipe"] != models["s2.png"]["recipe"]


def test_the_shards_of_one_process_share_one_network_under_out(tmp_path, monkeypatch):
    """A plain `retry` of a sharded folder runs every shard's ledger in one process, with one engine. A
    style has one network, OUT/models/<style>.pt, whichever shard makes its pairs: trained once, recorded in
    each shard's ledger that used it."""
    s = _plan_settings(tmp_path, 4, method="network", network_steps=2, refine_steps=3)
    shards = (Shard(2, 0), Shard(2, 1))
    assert all(any(sh.owns(f"p{i}.png", "s1.png") for i in range(4)) for sh in shards)  # both have pairs
    trained = _trainings(monkeypatch)
    local.run(s, Display(Console(quiet=True)), shards=shards)
    assert trained == [("0-of-2", "s1.png")]
    assert (s.out / "models" / "s1.png.pt").is_file()
    assert not any((sh.folder(s.out) / "models").exists() for sh in shards)


def test_a_growing_collection_keeps_its_network_and_makes_only_the_new_photo(tmp_path, monkeypatch):
    """16 photos made by a network (auto), then a 17th added: the second run makes that one pair and trains
    nothing. A model's recipe covered the photos it trained on, so one photo more redid all 17 pairs and
    retrained; a collection growing every evening was made again every night."""
    monkeypatch.setitem(BREAK_EVEN, "cpu", 16)
    s = _plan_settings(tmp_path, 16, method="auto", network_steps=20, refine_steps=2)
    trained = _trainings(monkeypatch)
    first = local.run(s, Display(Console(quiet=True)))
    assert first.made == 16 and first.failed == 0 and trained == [("out", "s1.png")]
    with Ledger(s.out) as led:
        assert set(led.methods().values()) == {"network"}
        before = {(r.content, r.recipe, r.finished_at) for r in led.rows()}
        model = led.models()["s1.png"]
    assert model["photos"] == 16 and json.loads(model["trained_on"]) == [f"p{i}.png" for i in sorted(range(16), key=str)]
    ck = torch.load(s.out / "models" / "s1.png.pt", weights_only=True)
    assert [n for n, _ in ck["photos"]] == json.loads(model["trained_on"]) and ck["state"]["step"] == 20
    make_image(s.content / "p16.png", 40, 32, 16)
    trained.clear()
    again = local.run(s, Display(Console(quiet=True)))
    assert again.made == 1 and again.failed == 0 and trained == []
    with Ledger(s.out) as led:
        assert before < {(r.content, r.recipe, r.finished_at) for r in led.rows()}  # the 16 untouched
        assert led.models()["s1.png"]["recipe"] == model["recipe"]
    # A retrain is asked for: it says what it will redo, and the next run trains once and makes those again.
    dry = cli("retrain", str(s.out), "--dry-run")
    assert dry.returncode == 0 and "s1.png: " in dry.stdout and "would make its 16 network-made pair(s)" in dry.stdout
    assert (s.out / "models" / "s1.png.pt").is_file()
    assert "no network of style 'nope'" in cli("retrain", str(s.out), "--style", "nope").stderr
    done = cli("retrain", str(s.out), "--style", "s1.png")
    assert done.returncode == 0 and "will make its 16 network-made pair(s)" in done.stdout, done.stderr
    assert not (s.out / "models" / "s1.png.pt").exists()
    redo = local.run(s, Display(Console(quiet=True)))
    assert redo.made == 16 and trained == [("out", "s1.png")]
    with Ledger(s.out) as led:
        assert led.models()["s1.png"]["photos"] == 16 and led.models()["s1.png"]["recipe"] == model["recipe"]
    # A photo removed: nothing to make, nothing trained.
    (s.content / "p3.png").unlink()
    trained.clear()
    assert local.run(s, Display(Console(quiet=True))).made == 0 and trained == []


def test_pairs_of_a_style_trained_elsewhere_wait_while_other_styles_are_made(tmp_path, monkeypatch):
    """Another worker holds the claim on s1's network: this one makes s2's pairs meanwhile (training s2's
    network itself), then, nothing else left, waits for s1's; here the other worker gives up its claim, so
    this one trains s1 too. Every pair made once, each network trained once."""
    import os
    import socket
    import threading
    from nst_batch.run import drive

    monkeypatch.setattr(drive, "DEFER_S", 0.2)
    s = _plan_settings(tmp_path, 3, method="network", network_steps=2, refine_steps=3)
    shutil.copy(s.styles / "s1.png", s.styles / "s2.png")
    s = s.replace(lease_s=2, per_style=(("s2.png", (("style_weight", 30.0),)),))
    claim = s.out / "models" / "s1.png.pt.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text(f"{socket.gethostname()}:{os.getppid()} feedbeef")  # a live process of this host
    stop = threading.Event()
    notes: list[str] = []
    waits = lambda: any("s1.png: its network is being trained by" in n and "waiting for it" in n for n in notes)  # noqa: E731

    def other_worker():  # beats until this worker says it waits for s1's network (at most 60 s), then lets go
        deadline = time.monotonic() + 60
        while not stop.wait(0.1) and time.monotonic() < deadline and not waits():
            os.utime(claim)
        claim.unlink()

    trained = _trainings(monkeypatch)
    monkeypatch.setattr(Display, "note", lambda self, m: notes.append(m))
    th = threading.Thread(target=other_worker)
    th.start()
    try:
        result = local.run(s, Display(Console(quiet=True)))
    finally:
        stop.set()
        th.join()
    assert result.made == 6 and result.failed == 0, result.failures
    assert trained == [("out", "s2.png"), ("out", "s1.png")]
    with Ledger(s.out) as led:
        rows = led.rows()
    assert all(r.attempts == 1 for r in rows)  # passed over uncounted
    last_s2 = max(r.finished_at for r in rows if r.style == "s2.png")
    assert all(r.finished_at > last_s2 for r in rows if r.style == "s1.png")
    assert waits()


def test_a_checkpoint_temporary_of_a_killed_trainer_is_removed(tmp_path):
    """A run killed while writing a checkpoint leaves `.STYLE.pt.PID-TOKEN.tmp` (weights and Adam state, tens
    of MB) in models/, OUT's or a shard's: removed as an output's would be; a user's file there stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = [out / "models" / f".s1.png.pt.{dead.pid}-0a1b2c3d.tmp",
             out / "shards" / "0-of-2" / "models" / f".s1.png.pt.{dead.pid}-0a1b2c3d.tmp"]
    users = [out / "models" / f".notes.txt.{dead.pid}.tmp", out / "mine" / f".s1.png.pt.{dead.pid}.tmp"]
    for p in stale + users:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a checkpoint")
    assert lifecycle.remove_stale_temporaries(out, []) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in users)


def json_curve(text):
    return json.loads(text)
