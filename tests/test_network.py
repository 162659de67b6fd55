"""Learned per-style networks (issue 13): the transformer, its training, resuming it, and the methods in a run."""

from __future__ import annotations

import torch

from nst_batch import images, network
from nst_batch.engine import Engine, to_tensor
from nst_batch.manifest import Settings

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _settings(folders, **kw) -> Settings:
    content, styles, out = folders
    base = dict(content=content, styles=styles, out=out, size=32, steps=4, log_every=2, scales=(1.0,),
                device="cpu", layers=LAYERS)
    return Settings(**{**base, **kw})


def _setup(folders):
    s = _settings(folders)
    engine = Engine(s)
    photos = [to_tensor(images.load_rgb(p), s.size) for p in sorted(s.content.iterdir())]
    style = engine.style_targets(s.styles / "s1.png", "s1", s.size)
    return s, engine, photos, style


def test_training_lowers_the_loss_and_resuming_equals_an_uninterrupted_run(folders):
    s, engine, photos, style = _setup(folders)
    args = (engine.net, engine.objective, photos, style)
    seen: list[float] = []
    whole = network.train_steps(network.new_state(0, engine.device), *args, 12,
                                on_loss=lambda step, t: seen.append(float(t.total.mean())))
    assert whole.step == 12 and len(seen) == 12
    assert sum(seen[-3:]) < sum(seen[:3])  # it learns (batches differ: compare a few steps)
    # "Killed" after 5 steps: only the checkpoint survives (saved and loaded as the runner does).
    first = network.train_steps(network.new_state(0, engine.device), *args, 12,
                                should_pause=lambda st: st.step == 5)
    assert first.step == 5
    saved = network.state_dict(first)
    del first
    resumed = network.train_steps(network.from_state_dict(saved, engine.device), *args, 12)
    assert resumed.step == 12
    for (k, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_network_keeps_any_size_and_stays_in_range():
    net = network.TransformerNet()
    for h, w in [(32, 32), (33, 47), (41, 30), (7, 9)]:
        y = network.apply(net, torch.rand(2, 3, h, w))
        assert y.shape == (2, 3, h, w) and 0 <= float(y.min()) and float(y.max()) <= 1
    x = torch.rand(1, 3, 40, 40)
    assert float((network.apply(net, x) - x).abs().mean()) < 0.1  # untrained: near the photo itself
