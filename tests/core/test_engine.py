"""The engine through its public interface: Jobs in, Made results out, nothing written anywhere."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import pytest

from nst_batch.files import decode
from nst_batch.config import manifest
from nst_batch.core import memory
from nst_batch.core.engine import Engine, Made, optim_config, resolve
from nst_batch.errors import PairError
from nst_batch.files.decode import to_tensor
from nst_batch.files.encode import encode
from nst_batch.files.stage import StyleImages, load_photo
from nst_batch.config.manifest import Settings
from nst_batch.batch.plan import recipe_settings
from nst_batch.core.pyramid import auto_scales

from conftest import CountingNet, engine_of, make_image, path_job

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _settings(folders, **kw) -> Settings:
    content, styles, out = folders
    base = dict(content=content, styles=styles, out=out, size=32, steps=4, log_every=2, scales=(1.0,),
                device="cpu", layers=LAYERS)
    return Settings(**{**base, **kw})


def _job(engine: Engine, content: str, style: str, photo=None):
    s = engine.settings
    return path_job(engine, s.content / content, s.styles / style, photo=photo)


def test_jobs_in_results_out_and_no_file_written(folders, tmp_path, monkeypatch):
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    s = _settings(folders)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    engine = engine_of(s)
    logged: list[tuple[str, int]] = []
    photo = to_tensor(decode.load_rgb(s.content / "square.png"), s.size)
    made = engine.make([_job(engine, "wide.png", "s1.png"), _job(engine, "square.png", "s2.jpg", photo=photo)],
                       on_log=lambda job, row: logged.append((job.content, row.step)))
    assert [m.job.content for m in made] == ["wide.png", "square.png"]
    wide, square = made
    for m in (wide, square):
        assert m.ok and m.note is None, m.error
        assert m.image.shape[0] == 1 and max(m.image.shape[-2:]) == 32 and m.image.device.type == "cpu"
        assert m.final.total < m.start.total  # it optimised: the no_progress check passed
        assert m.logs[-1].step == m.final.step and [r.step for r in m.logs] == [2, 4]  # log_every 2; the last is final
        assert m.steps == 4
    assert wide.image.shape[-2:] == (20, 32)  # 64x40 at 32 px, aspect kept
    # A photo that cannot be read fails at decoding, in the I/O stage, before any job is made of it.
    with pytest.raises(PairError) as missing:
        load_photo(s.content / "nothing.png", s.size, s.max_megapixels)
    assert missing.value.kind == "unreadable"
    assert ("wide.png", 4) in logged and ("square.png", 2) in logged
    # Nothing on disk: not in the working directory, not in OUT, not beside the inputs.
    assert list(empty.iterdir()) == [] and not s.out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_encode_gives_the_bytes_of_the_file_the_runner_would_write(folders):
    t = torch.rand(1, 3, 20, 24)
    for fmt, pil in (("png", "PNG"), ("jpg", "JPEG")):
        enc = encode(t, None, Settings(format=fmt, quality=90))
        with Image.open(io.BytesIO(enc.data)) as im, Image.open(io.BytesIO(enc.thumb)) as thumb:
            assert im.format == pil and im.size == (24, 20) and thumb.format == "JPEG"
    back = to_tensor(Image.open(io.BytesIO(encode(t, None, Settings()).data)).convert("RGB"), 24)
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


def _two_photos(tmp_path, size=32, batch=2, style_size=None):
    content, styles = tmp_path / "c", tmp_path / "s"
    for i in range(2):
        make_image(content / f"p{i}.png", 48, 32, 30 + i)  # 3:2, like a print
    make_image(styles / "s.png", 32, 32, 40)
    s = Settings(content=content, styles=styles, out=tmp_path / "out", size=size, steps=4, log_every=2,
                 scales=(1.0,), device="cpu", layers=LAYERS, batch=batch, style_size=style_size)
    return s


def _jobs(engine: Engine) -> list:
    s = engine.settings
    return [path_job(engine, s.content / f"p{i}.png", s.styles / "s.png") for i in range(2)]


PLENTY = lambda device: 1 << 40  # noqa: E731  (free memory a test says there is)


def test_out_of_memory_splits_a_batch_then_fails_the_pair_as_oom_naming_a_size_that_fits(tmp_path):
    s = _two_photos(tmp_path, size=48, style_size=16)  # the style's 256 px always fit
    notes: list[str] = []

    # A batch of two 48x32 images (3072 px) is over the budget, one (1536) is not: split, then made as asked.
    tight = _Tight(s, budget=2000)
    made = tight.make(_jobs(tight), on_note=notes.append)
    assert all(m.ok and m.note is None and m.image.shape[-2:] == (32, 48) for m in made), made
    assert notes == ["a batch of 2 ran out of memory; making them one at a time"]

    # One image is over it too: the pair fails as oom, with no image: never made smaller than its recipe
    # says (it was once made at 34 px, noted, and marked done). The size named has at most half the pixels.
    tight = _Tight(s, budget=1000)
    made = tight.make(_jobs(tight)[:1])
    assert isinstance(made[0], Made) and made[0].error.kind == "oom" and made[0].image is None
    msg = str(made[0].error)
    assert msg.startswith("ran out of memory at 48 px (") and msg.endswith("; 32 px would fit; lower 'size'"), msg


class _Tight(Engine):
    def __init__(self, settings, budget, free_memory=PLENTY):
        super().__init__(settings, free_memory=free_memory, style_pixels=StyleImages(settings.max_megapixels))
        self.net = _PixelBudget(self.net, budget)


def test_a_pair_predicted_not_to_fit_fails_as_oom_before_it_starts(tmp_path):
    s = _two_photos(tmp_path, size=64, batch=1)
    free = memory.need(27, 40, 1, "lbfgs", s.steps).bytes  # room for the photo at 40 px, not at 64
    engine = engine_of(s, free_memory=lambda device: free)
    jobs = _jobs(engine)
    calls: list[bool] = []
    engine.net = CountingNet(engine.net, calls)
    (m,) = engine.make(jobs[:1])
    assert m.error is not None and m.error.kind == "oom" and m.image is None and m.logs == []
    assert calls == [] and engine.style_passes == 0  # refused before any work
    msg = str(m.error)
    assert msg.startswith("needs ~") and " at 64 px (64x43), " in msg and msg.endswith(" free; 32 px would fit; lower 'size'")
    fits = int(msg.split("; ")[1].split()[0])
    assert memory.need(21, 32, 1, "lbfgs", s.steps).bytes <= free < memory.need(32, 48, 1, "lbfgs", s.steps).bytes
    assert fits == memory.largest_fitting(48, 32, free, 1, "lbfgs", s.steps, 64) == 32
    # Made at the size that message names, it runs.
    engine = engine_of(s.replace(size=fits), free_memory=lambda device: free)
    (ok,) = engine.make(_jobs(engine)[:1])
    assert ok.ok and max(ok.image.shape[-2:]) == 32


def test_the_memory_check_counts_the_styles_own_steps(tmp_path):
    """per_style may raise `steps`, and L-BFGS keeps a pair of image-sized vectors per step (up to 100): the
    check counts the style's steps, not the run's (it did, and let a pair start that it says cannot fit)."""
    s = _two_photos(tmp_path, size=48, batch=1)  # the run's steps: 4
    free = memory.need(32, 48, 1, "lbfgs", s.steps).bytes  # room for the run's steps at 48x32, exactly
    assert memory.need(32, 48, 1, "lbfgs", 100).bytes > free
    engine = engine_of(s, free_memory=lambda device: free)
    jobs = _jobs(engine)
    calls: list[bool] = []
    engine.net = CountingNet(engine.net, calls)
    (m,) = engine.make([dataclasses.replace(jobs[0], overrides=(("steps", 100),))])
    assert m.error is not None and m.error.kind == "oom" and calls == []  # refused before any work
    assert memory.largest_fitting(48, 32, free, 1, "lbfgs", 100, 48) == int(str(m.error).split("; ")[1].split()[0])
    (ok,) = engine.make(jobs[:1])  # the run's own steps fit
    assert ok.ok and calls


def test_a_batch_predicted_not_to_fit_is_made_one_at_a_time(tmp_path):
    s = _two_photos(tmp_path)
    free = memory.need(21, 32, 1, "lbfgs", s.steps).bytes  # one 32 px image, not two
    notes: list[str] = []
    engine = engine_of(s, free_memory=lambda device: free)
    made = engine.make(_jobs(engine), on_note=notes.append)
    assert all(m.ok and m.image.shape[-2:] == (21, 32) for m in made)
    assert notes == ["a batch of 2 would not fit in memory; making them one at a time"]


def test_scales_auto_is_resolved_once_from_the_size(folders):
    assert [auto_scales(n) for n in (64, 192, 512, 1023)] == [(0.5, 1.0)] * 4  # as the old default
    assert auto_scales(1024) == auto_scales(1536) == (0.25, 0.5, 1.0)
    assert auto_scales(2048) == auto_scales(3072) == (0.125, 0.25, 0.5, 1.0)  # coarsest 256 and 384 px
    assert auto_scales(4096) == (0.0625, 0.125, 0.25, 0.5, 1.0)
    for n in (512, 1024, 1536, 2048, 3072, 4096, 16384):  # the coarsest level is where VGG's field suits
        assert 256 <= n * auto_scales(n)[0] < 512
    s = _settings(folders, scales="auto", size=2048)
    r = resolve(s, "cpu")
    assert r.settings.scales == r.optim.scales == (0.125, 0.25, 0.5, 1.0)
    assert recipe_settings(r.settings)["scales"] == [0.125, 0.25, 0.5, 1.0]  # the recipe records the levels
    assert resolve(s.replace(scales=(0.5, 1.0)), "cpu").settings.scales == (0.5, 1.0)  # an explicit list stays
    with pytest.raises(ValueError, match="not resolved"):
        optim_config(s.replace(precision="fp32"), channels_last=False)
    assert Settings().scales == "auto" and manifest.apply(Settings(), {"scales": [1.0]}, "m").scales == (1.0,)


def test_the_engine_writes_nothing_it_is_given_no_folder_for(folders, tmp_path, monkeypatch):
    """A job carries its photo, decoded: the engine needs no content file at all (a driver elsewhere can
    send it), nor the name of one."""
    monkeypatch.chdir(tmp_path)
    s = _settings(folders)
    photo = to_tensor(decode.load_rgb(s.content / "tall.jpg"), s.size)
    engine = engine_of(s)
    (m,) = engine.make([path_job(engine, Path("no/such/photo.jpg"), s.styles / "s1.png", photo=photo)])
    assert m.ok and max(m.image.shape[-2:]) == 32
    assert not os.path.exists("no")
