"""CUDA graphs for L-BFGS's chunks (optimize.GraphChunks), exercised on the CPU.

On a CPU nothing is captured and the results are those of eager chunks; a capture that fails is noted once
and the engine goes on eagerly with the same results; and the warm-up / capture / replay bookkeeping, with
a stand-in graph that replays the captured chunk eagerly, gives the same images as never capturing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nst_batch.config.manifest import Settings
from nst_batch.core import optimize as graphs  # GraphChunks and its _capture
from nst_batch.core.engine import Engine, resolve
from nst_batch.core.optimize import EagerChunks
from nst_batch.files.stage import StyleImages

from conftest import make_image, path_job

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def settings(tmp_path) -> Settings:
    for i in range(2):
        make_image(tmp_path / "content" / f"p{i}.png", 40, 32, 50 + i)
    make_image(tmp_path / "styles" / "s.png", 40, 40, 7)
    # 35 steps a scale: chunks of 10 (the first with the first evaluation), 10 (the warm-up), 10, 5.
    return Settings(content=tmp_path / "content", styles=tmp_path / "styles", out=tmp_path / "out", size=40,
                    steps=35, log_every=5, scales=(0.5, 1.0), device="cpu", layers=LAYERS, batch=2)


def _engine(s: Settings, cuda_graphs: bool) -> Engine:
    """The CUDA configuration (bf16, channels_last) on the CPU, with or without graphs."""
    config = dataclasses.replace(resolve(s, "cuda"), cuda_graphs=cuda_graphs)
    return Engine(s, torch.device("cpu"), config, style_pixels=StyleImages(s.max_megapixels))


def _make(engine: Engine, notes: list[str] | None = None):
    s = engine.settings
    jobs = [path_job(engine, s.content / f"p{i}.png", s.styles / "s.png") for i in range(2)]
    made = engine.make(jobs, on_note=(notes.append if notes is not None else None))
    assert all(m.ok for m in made), [m.error for m in made]
    return made


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image)
        assert [r.total for r in x.logs] == [r.total for r in y.logs]


def test_resolve_turns_graphs_on_for_cuda_only():
    s = Settings()
    assert resolve(s, "cuda").cuda_graphs and not resolve(s, "cpu").cuda_graphs and not resolve(s, "mps").cuda_graphs


def test_on_the_cpu_nothing_is_captured_and_results_are_eager_ones(settings):
    graphed = _engine(settings, True)
    assert isinstance(graphed.chunks, graphs.GraphChunks)
    eager = _engine(settings, False)
    assert type(eager.chunks) is EagerChunks
    _same(_make(graphed), _make(eager))
    assert graphed.chunks.captures == 0 and not graphed.chunks.broken


class _Replaying:
    """A stand-in CUDA graph: capturing runs nothing, each replay runs the captured chunk eagerly."""

    made: list["_Replaying"] = []

    def __init__(self, work, device):
        self.work, self.replays = work, 0
        _Replaying.made.append(self)

    def replay(self):
        self.replays += 1
        self.work()


def test_warm_up_capture_and_replay_give_the_eager_images(settings, monkeypatch):
    monkeypatch.setattr(graphs, "_capture", _Replaying)
    _Replaying.made = []
    engine = _engine(settings, True)
    engine.chunks.usable = lambda st: True  # as if the state were on a CUDA device
    graphed = _make(engine)
    _same(graphed, _make(_engine(settings, False)))
    # One graph a scale (a state of its own), replayed for the one full chunk after the warm-up.
    assert engine.chunks.captures == 2 and [g.replays for g in _Replaying.made] == [1, 1]
    assert engine.chunks._for is None  # released at the end of each scale


def test_a_failed_capture_is_noted_once_and_the_run_goes_on_eagerly(settings, monkeypatch):
    def fail(work, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", fail)
    engine = _engine(settings, True)
    engine.chunks.usable = lambda st: True
    notes: list[str] = []
    first = _make(engine, notes)
    _make(engine, notes)  # a second make: still eager, nothing noted again
    assert engine.chunks.broken and engine.chunks.captures == 0
    assert notes == ["CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); "
                     "running without graphs"]
    _same(first, _make(_engine(settings, False)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh's machine)")
def test_on_cuda_chunks_are_captured_replayed_and_read_nothing_on_the_host(settings, monkeypatch):
    """The real thing: a graph a scale, no host read inside a chunk (sync debug mode 'error' turns one into an
    error, which would fail the pairs), and the images of an eager engine within rounding."""
    from nst_batch.core import lbfgs

    monkeypatch.setattr(lbfgs, "run_chunk", lbfgs.sync_checked(lbfgs.run_chunk))
    s = settings.replace(device="cuda", precision="fp32")

    def engine(graphs_on: bool) -> Engine:
        config = dataclasses.replace(resolve(s, "cuda"), cuda_graphs=graphs_on)
        return Engine(s, torch.device("cuda"), config, style_pixels=StyleImages(s.max_megapixels))

    graphed_engine = engine(True)
    notes: list[str] = []
    graphed = _make(graphed_engine, notes)
    assert notes == [] and graphed_engine.chunks.captures == 2 and not graphed_engine.chunks.broken
    eager = _make(engine(False))
    for x, y in zip(graphed, eager):
        assert (x.image - y.image).abs().max() * 255 <= 2
        assert x.final.total == pytest.approx(y.final.total, rel=1e-2)
