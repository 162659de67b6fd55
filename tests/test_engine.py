"""The engine through its public interface: Jobs in, Made results out, nothing written anywhere."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from nst_batch import images
from nst_batch.engine import Engine, Job, Made, encode, optim_config, resolve, to_tensor
from nst_batch.manifest import Settings

from conftest import make_image

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _settings(folders, **kw) -> Settings:
    content, styles, out = folders
    base = dict(content=content, styles=styles, out=out, size=32, steps=4, log_every=2, scales=(1.0,),
                device="cpu", layers=LAYERS)
    return Settings(**{**base, **kw})


def _job(s: Settings, content: str, style: str, image=None) -> Job:
    return Job(content, style, s.content / content, s.styles / style, image=image)


def test_jobs_in_results_out_and_no_file_written(folders, tmp_path, monkeypatch):
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    s = _settings(folders)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    engine = Engine(s)
    logged: list[tuple[str, int]] = []
    photo = images.load_rgb(s.content / "square.png")
    made = engine.make([_job(s, "wide.png", "s1.png"), _job(s, "square.png", "s2.jpg", image=photo),
                        _job(s, "nothing.png", "s1.png")],
                       on_log=lambda job, row: logged.append((job.content, row.step)))
    assert [m.job.content for m in made] == ["wide.png", "square.png", "nothing.png"]
    wide, square, missing = made
    for m in (wide, square):
        assert m.ok and m.note is None, m.error
        assert m.image.shape[0] == 1 and max(m.image.shape[-2:]) == 32 and m.image.device.type == "cpu"
        assert m.final.total < m.start.total  # it optimised: the no_progress check passed
        assert m.logs[-1].step == m.final.step and [r.step for r in m.logs] == [2, 4]  # log_every 2; the last is final
        assert m.steps == 4
    assert wide.image.shape[-2:] == (20, 32)  # 64x40 at 32 px, aspect kept
    assert missing.error is not None and missing.error.kind == "unreadable" and missing.image is None
    assert ("wide.png", 4) in logged and ("square.png", 2) in logged
    # Nothing on disk: not in the working directory, not in OUT, not beside the inputs.
    assert list(empty.iterdir()) == [] and not s.out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_encode_gives_the_bytes_of_the_file_the_runner_would_write(folders):
    t = torch.rand(1, 3, 20, 24)
    made = Made(Job("c", "s", Path("c"), Path("s")), image=t)
    for fmt, pil in (("png", "PNG"), ("jpg", "JPEG")):
        enc = encode(made, Settings(format=fmt, quality=90))
        with Image.open(io.BytesIO(enc.data)) as im, Image.open(io.BytesIO(enc.thumb)) as thumb:
            assert im.format == pil and im.size == (24, 20) and thumb.format == "JPEG"
    back = to_tensor(Image.open(io.BytesIO(encode(made, Settings()).data)).convert("RGB"), 24)
    assert (back - t).abs().max() <= 0.5 / 255 + 1e-6  # PNG is lossless: only the rounding to 8 bits


def test_resolve_decides_precision_once_and_the_optimiser_reads_it(folders):
    s = _settings(folders, precision="auto", steps=7, stop_window=3)
    cuda, cpu = resolve(s, "cuda"), resolve(s, "cpu")
    assert (cuda.settings.precision, cpu.settings.precision) == ("bf16", "fp32")
    assert cuda.optim.autocast_dtype == torch.bfloat16 and cpu.optim.autocast_dtype is None
    assert cuda.optim == optim_config(cuda.settings, channels_last=True)
    assert cpu.optim.steps == 7 and cpu.optim.stop_window == 3 and cpu.optim.scales == s.scales
    engine = Engine(s, torch.device("cpu"))
    assert engine.settings.precision == "fp32"  # what the plan's recipe is made from


class _PixelBudget(nn.Module):
    """The engine's own VGG, but it runs out of memory (the error CUDA raises) past a number of pixels."""

    def __init__(self, net, budget: int):
        super().__init__()
        self.net, self.budget = net, budget

    def forward(self, x, layers):
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x, layers)


class _Tight(Engine):
    def __init__(self, settings, budget):
        super().__init__(settings)
        self.net = _PixelBudget(self.net, budget)


def test_out_of_memory_splits_a_batch_then_shrinks_then_fails_as_oom(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    for i in range(2):
        make_image(content / f"p{i}.png", 32, 32, 30 + i)
    make_image(styles / "s.png", 32, 32, 40)
    s = Settings(content=content, styles=styles, out=tmp_path / "out", size=32, steps=4, log_every=2,
                 scales=(1.0,), device="cpu", layers=LAYERS, batch=2)
    jobs = [Job(f"p{i}.png", "s.png", content / f"p{i}.png", styles / "s.png") for i in range(2)]
    notes: list[str] = []

    # A batch of two 32 px images (2048 px) is over the budget, one (1024) is not: split, then made as asked.
    made = _Tight(s, budget=1500).make(jobs, on_note=notes.append)
    assert all(m.ok and m.note is None and max(m.image.shape[-2:]) == 32 for m in made), made
    assert notes == ["a batch of 2 ran out of memory; making them one at a time"]

    # One 32 px image is over it too: each is made at 32/sqrt(2) = 22 px, and says so.
    notes.clear()
    made = _Tight(s, budget=600).make(jobs, on_note=notes.append)
    assert all(m.ok and max(m.image.shape[-2:]) == 22 for m in made), made
    assert all(m.note == "ran out of memory at 32 px; made at 22 px instead" for m in made)

    # Not even that fits: each fails as oom, with no image.
    made = _Tight(s, budget=300).make(jobs[:1])
    assert isinstance(made[0], Made) and made[0].error.kind == "oom" and made[0].image is None
    assert "lower 'size'" in str(made[0].error)


def test_the_engine_writes_nothing_it_is_given_no_folder_for(folders, tmp_path, monkeypatch):
    """A job whose photo is already decoded needs no content file at all: a driver elsewhere can send it."""
    monkeypatch.chdir(tmp_path)
    s = _settings(folders)
    photo = images.load_rgb(s.content / "tall.jpg")
    gone = Path("no/such/photo.jpg")
    (m,) = Engine(s).make([Job("photo.jpg", "s1.png", gone, s.styles / "s1.png", image=photo)])
    assert m.ok and max(m.image.shape[-2:]) == 32
    assert not os.path.exists("no")
