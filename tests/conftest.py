"""Shared fixtures: tiny real images on disk, fast settings, and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst_batch.config.manifest import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "images"


def make_image(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> Path:
    """A smooth random colour image (gradients + blobs): VGG sees real structure in it, unlike flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(2, 12, 2).tolist() + [rng.uniform(0, 6.3)]
            a[..., c] += np.sin(fx * xx * 6.28 + fy * yy * 6.28 + ph)
    a = (a - a.min()) / (a.max() - a.min() + 1e-9) * 255
    im = Image.fromarray(a.astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """content/ with 3 photos of different shapes, styles/ with 2 styles, and an out/ path."""
    content, styles = tmp_path / "content", tmp_path / "styles"
    make_image(content / "wide.png", 64, 40, 1)
    make_image(content / "tall.jpg", 36, 60, 2)
    make_image(content / "square.png", 48, 48, 3)
    make_image(styles / "s1.png", 64, 64, 10)
    make_image(styles / "s2.jpg", 56, 40, 11)
    return content, styles, tmp_path / "out"


@pytest.fixture
def fast_settings(folders) -> Settings:
    """Settings small enough that a pair takes well under a second on 2 CPU cores."""
    content, styles, out = folders
    return Settings(content=content, styles=styles, out=out, size=48, steps=4, log_every=2, scales=(1.0,),
                    device="cpu", lease_s=30)


@pytest.fixture
def shared_images() -> Path:
    if not (SHARED_IMAGES / "content").is_dir():
        pytest.skip("../shared/images is not present")
    return SHARED_IMAGES


def cli(*args: str, cwd: Path | None = None, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run `python -m nst_batch.cli ARGS` in a subprocess, as a user would run `nst-batch`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "nst_batch.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def optim_config(**kw):
    """A test's optimiser settings: these values unless given (OptimConfig has no defaults of its own;
    these are the ones it used to have)."""
    from nst_batch.core.optimize import OptimConfig

    base = dict(steps=300, optimizer="lbfgs", lr=0.02, scales=(1.0,), init="content", seed=0, log_every=10,
                stop_window=0, stop_tolerance=1e-3, autocast_dtype=None, channels_last=False)
    return OptimConfig(**{**base, **kw})


class CountingNet(torch.nn.Module):
    """A real VGG feature net, counting its forward passes that carry a gradient (evaluations of the
    objective; style and content targets are computed without one)."""

    def __init__(self, net, calls: list):
        super().__init__()
        self.net, self.calls = net, calls

    def forward(self, x, wanted):
        self.calls.append(torch.is_grad_enabled() and x.requires_grad)
        return self.net(x, wanted)



def engine_of(settings: Settings, **kw):
    """An Engine as a driver makes one: given the style images (files.stage.StyleImages, which `path_job`
    tells where each style's file is, `engine.style_pixels`)."""
    from nst_batch.run.jobs import file_engine

    return file_engine(settings, **kw)


def path_job(engine, content_path: Path, style_path: Path, **kw):
    """The engine's Job for a photo file and a style file (run.jobs.file_job)."""
    from nst_batch.run.jobs import file_job

    return file_job(engine, content_path, style_path, **kw)


class HostReads:
    """Counts every call that reads a tensor's value on the host (a GPU would wait for its queue at each):
    patched on torch.Tensor for the test's duration."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(*args, _orig=orig, **kw):
                self.count += 1
                return _orig(*args, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# One local Ray cluster a test module (tests/run/test_ray.py, test_ray_networks.py).
@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()  # stops the processes this init started, nothing else
