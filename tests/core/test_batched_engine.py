"""The engine's L-BFGS is core/lbfgs.py: each image of a batch on its own, the host read once a chunk.

Through Engine.make: an image's output does not depend on its batch companions; a whole make reads the
host at most 0.25 times per evaluation (the old optimiser read it 8.5 times); the tutorial preset still
converges; the CUDA configuration (bf16 autocast) on the CPU still moves the image in its first steps;
the memory model counts m = 10 curvature pairs, not 100.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nst_batch.config.manifest import Settings
from nst_batch.core import memory, optimize
from nst_batch.core.engine import Engine, resolve
from nst_batch.core.lbfgs import HISTORY
from nst_batch.run.jobs import file_engine

from conftest import CountingNet, HostReads, ROOT, make_image, path_job

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(tmp_path: Path, n: int, **kw) -> Settings:
    content, styles = tmp_path / "content", tmp_path / "styles"
    for i in range(n):
        make_image(content / f"p{i}.png", 48, 32, 30 + i)
    make_image(styles / "s.png", 48, 48, 9)
    base = dict(content=content, styles=styles, out=tmp_path / "out", size=48, steps=12, log_every=4,
                scales=(1.0,), device="cpu", layers=LAYERS)
    return Settings(**{**base, **kw})


def _jobs(engine: Engine, names: list[str]):
    s = engine.settings
    return [path_job(engine, s.content / f"{n}.png", s.styles / "s.png") for n in names]


def test_an_image_does_not_depend_on_its_batch_companions(tmp_path):
    """p0 made in a batch of 3 with p1 and p2, then with p3 and p4: the same image. Before, the batch's
    losses were summed into one objective with one line search and one history: p0's result moved with
    its companions."""
    s = _settings(tmp_path, 5, batch=3)
    engine = file_engine(s)
    calls: list[bool] = []
    engine.net = CountingNet(engine.net, calls)
    first = engine.make(_jobs(engine, ["p0", "p1", "p2"]))
    assert calls.count(True) == s.steps  # one batch of 3: each evaluation evaluates all three
    second = engine.make(_jobs(engine, ["p0", "p3", "p4"]))
    assert all(m.ok for m in first + second), [m.error for m in first + second]
    assert (first[0].image - second[0].image).abs().max() * 255 <= 2
    assert (first[0].image - first[1].image).abs().max() * 255 > 10  # the images themselves differ
    assert first[0].final.total == pytest.approx(second[0].final.total, rel=1e-3)


def test_each_image_stops_on_its_own_and_reports_its_own_steps(tmp_path):
    """With the stop rule, each image of a batch stops when its own loss settles: p0 takes as many steps
    (Made.steps) with p1 and p2 beside it as with p3 and p4, and the images within the batch stop apart."""
    s = _settings(tmp_path, 5, batch=3, steps=60, stop_window=3, stop_tolerance=0.02, log_every=5)
    engine = file_engine(s)
    first = engine.make(_jobs(engine, ["p0", "p1", "p2"]))
    second = engine.make(_jobs(engine, ["p0", "p3", "p4"]))
    assert all(m.ok for m in first + second), [m.error for m in first + second]
    steps = [m.steps for m in first + second]
    assert first[0].steps == second[0].steps < 60, steps
    assert len(set(steps)) > 1, steps  # not one count for the whole batch
    assert (first[0].image - second[0].image).abs().max() * 255 <= 2




def test_a_whole_make_reads_the_host_at_most_once_per_four_evaluations(tmp_path, monkeypatch):
    s = _settings(tmp_path, 1, steps=30, scales=(0.5, 1.0), log_every=5)
    engine = file_engine(s)
    calls: list[bool] = []
    engine.net = CountingNet(engine.net, calls)
    jobs = _jobs(engine, ["p0"])
    reads = HostReads(monkeypatch)
    (m,) = engine.make(jobs)
    monkeypatch.undo()
    assert m.ok, m.error
    evaluations = calls.count(True)
    assert evaluations == m.steps == 60  # 30 a scale: the stop rule is off by default
    assert reads.count / evaluations <= 0.25, reads.count
    assert [r.step for r in m.logs] == list(range(5, 61, 5))  # every log_every steps, read a chunk at a time


def test_the_tutorial_preset_still_converges_at_48_px():
    """The tutorial weights on Caffe-scaled features (losses near 1e13 at the start): no no_progress."""
    s = Settings(content=ROOT / "data/content", styles=ROOT / "data/styles", size=48, steps=20, layers="tutorial",
                 device="cpu")
    engine = file_engine(s)
    (m,) = engine.make([path_job(engine, ROOT / "data/content/chelsea.jpg", ROOT / "data/styles/composition_vii.jpg")])
    assert m.ok, m.error
    assert m.final.total < 0.1 * m.start.total


def test_the_cuda_configuration_moves_the_image_in_its_first_steps(tmp_path):
    """resolve(settings, "cuda") on the CPU: bf16 autocast on the forward, channels_last. The first step moves
    pixel values by about 1%, which a bf16 forward sees: the loss falls from the second evaluation on."""
    s = _settings(tmp_path, 1, steps=8, log_every=1, precision="auto")
    from nst_batch.files.stage import StyleImages

    engine = Engine(s, torch.device("cpu"), resolve(s, "cuda"), style_pixels=StyleImages(s.max_megapixels))
    assert engine.optim.autocast_dtype == torch.bfloat16 and engine.optim.channels_last
    (m,) = engine.make(_jobs(engine, ["p0"]))
    assert m.ok, m.error
    rows = m.logs
    assert rows[0].step == 1 and rows[1].total < 0.98 * rows[0].total  # rows[0]: the photo itself
    assert m.final.total < 0.8 * m.start.total


def test_the_memory_model_counts_ten_curvature_pairs():
    per = memory.VECTOR_BYTES_PER_PX
    assert HISTORY == 10
    assert memory.optimiser_bytes_per_px("lbfgs", 300) == (2 * HISTORY + memory.LBFGS_STATE_VECTORS) * per
    assert memory.optimiser_bytes_per_px("lbfgs", 300) == memory.optimiser_bytes_per_px("lbfgs", 11)
    assert memory.optimiser_bytes_per_px("lbfgs", 4) == (2 * 3 + memory.LBFGS_STATE_VECTORS) * per  # 3 iterations
    assert memory.optimiser_bytes_per_px("adam", 300) == 2 * per
    # 1024x768 at 300 steps: the optimiser's share is 28 vectors (was 200), about 264 MB an image.
    assert memory.optimiser_bytes_per_px("lbfgs", 300) * 1024 * 768 == pytest.approx(264e6, rel=0.01)


def test_a_recorder_writes_its_evaluations_from_slot_zero():
    """What a CUDA graph of one chunk replays: the same slots each chunk (optimize.Recorder)."""
    def terms(x):
        from nst_batch.core.losses import LossTerms

        v = (x - 0.25).pow(2).flatten(1).sum(1)
        return LossTerms(v, 2 * v, torch.zeros_like(v))

    rec = optimize.Recorder(terms, 2, torch.device("cpu"))
    f, g = rec(torch.full((2, 3, 2, 2), 0.5))
    assert rec.slot == 1 and torch.equal(rec.rec[0, 3], f) and torch.allclose(g, torch.full_like(g, 1.5))


# -- batch: auto ---------------------------------------------------------------------------------------------


def test_auto_batch_is_as_many_as_the_memory_model_fits():
    one = memory.need(32, 48, 1, "lbfgs", 30).bytes - memory.CONSTANT_BYTES  # one image's share
    free = int((memory.CONSTANT_BYTES + 5.5 * one) / memory.AUTO_SHARE)
    assert memory.auto_batch(32, 48, "lbfgs", 30, free, 64) == 5
    assert memory.need(32, 48, 5, "lbfgs", 30).bytes <= memory.AUTO_SHARE * free < memory.need(32, 48, 6, "lbfgs", 30).bytes
    assert memory.auto_batch(32, 48, "lbfgs", 30, free, 3) == 3  # capped
    assert memory.auto_batch(32, 48, "lbfgs", 30, 1, 64) == 1  # not even one fits: 1 (the oom check says so)
    assert memory.auto_batch(32, 48, "lbfgs", 30, None, 64) == 1  # unknown free memory


def test_batch_auto_on_a_cpu_is_one_and_on_cuda_what_fits_resolved_once_per_shape(tmp_path):
    s = _settings(tmp_path, 5, steps=4, batch="auto")
    assert resolve(s, "cpu").auto_batch_max == 1 and resolve(s, "cuda").auto_batch_max == 64
    cpu = file_engine(s, free_memory=lambda device: 1 << 40)
    assert cpu.batch_size(_jobs(cpu, ["p0"])[0]) == 1

    one = memory.need(32, 48, 1, "lbfgs", s.steps).bytes - memory.CONSTANT_BYTES
    asked: list[int] = []

    def free(device):
        asked.append(1)
        return int((memory.CONSTANT_BYTES + 2.5 * one) / memory.AUTO_SHARE)  # room for 2 photos at 48x32

    from nst_batch.files.stage import StyleImages

    batches: list[int] = []

    class Counted(Engine):
        def _batch(self, jobs, on_log):
            batches.append(len(jobs))
            return super()._batch(jobs, on_log)

    gpu = Counted(s, torch.device("cpu"), resolve(s, "cuda"), free_memory=free, style_pixels=StyleImages(s.max_megapixels))
    made = gpu.make(_jobs(gpu, ["p0", "p1", "p2", "p3", "p4"]))
    assert all(m.ok for m in made), [m.error for m in made]
    assert batches == [2, 2, 1]
    assert gpu._auto_batch == {(32, 48, "lbfgs", 4): 2}
    calls = len(asked)
    gpu.make(_jobs(gpu, ["p0", "p1"]))
    assert batches[-1] == 2 and len(asked) == calls + 1  # the oom check asks again; auto was kept


def test_batch_accepts_auto_and_an_integer_only():
    from nst_batch.config.settings import check
    from nst_batch.errors import ConfigError

    assert check("batch", "auto", "x") == "auto" and check("batch", 8, "x") == 8
    for bad in (0, 257, "many", 2.0, True):
        with pytest.raises(ConfigError, match="batch"):
            check("batch", bad, "x")
    assert Settings(batch="auto").most_per_batch() == 64 and Settings(batch=3).most_per_batch() == 3


# -- bucket: photos of nearly one shape share a batch ----------------------------------------------------------


def test_bucket_puts_nearly_equal_shapes_in_one_batch_and_gives_each_its_own_shape_back(tmp_path):
    s = _settings(tmp_path, 2, steps=6, batch=4)
    make_image(s.content / "short.png", 48, 30, 40)  # 48x30 beside the 48x32 ones
    batches: list[list[tuple[int, int]]] = []

    class Counted(Engine):
        def _batch(self, jobs, on_log):
            batches.append([tuple(j.photo.shape[-2:]) for j in jobs])
            return super()._batch(jobs, on_log)

    from nst_batch.files.stage import StyleImages

    for bucket, expected in ((0, 2), (8, 1)):
        batches.clear()
        t = s.replace(bucket=bucket)
        engine = Counted(t, style_pixels=StyleImages(t.max_megapixels))
        made = engine.make(_jobs(engine, ["p0", "short", "p1"]))
        assert all(m.ok for m in made), [m.error for m in made]
        assert len(batches) == expected, batches
        assert [tuple(m.image.shape[-2:]) for m in made] == [(32, 48), (30, 48), (32, 48)]  # each its own shape
        assert engine.shape_of(_jobs(engine, ["short"])[0]) == ((32, 48) if bucket else (30, 48))
        if not bucket:
            plain = made
    assert not torch.equal(made[1].image, plain[1].image)  # 48x30 was made at 48x32, then resized back
    for i in (0, 2):  # 48x32 is its own bucket: the same images, whatever shared their batch
        assert (made[i].image - plain[i].image).abs().max() * 255 <= 2


def test_bucket_rounds_each_side_to_the_nearest_multiple_halves_up(tmp_path):
    s = _settings(tmp_path, 1, bucket=32)
    engine = file_engine(s)
    job = _jobs(engine, ["p0"])[0]
    shapes = {}
    for h, w in ((341, 512), (336, 512), (335, 512), (12, 20)):
        shapes[(h, w)] = engine.shape_of(dataclasses.replace(job, photo=torch.zeros(1, 3, h, w)))
    assert shapes == {(341, 512): (352, 512), (336, 512): (352, 512), (335, 512): (320, 512), (12, 20): (32, 32)}


def test_bucket_is_in_the_recipe_only_when_on():
    from nst_batch.batch.plan import recipe_settings

    assert "bucket" not in recipe_settings(Settings()) and recipe_settings(Settings(bucket=32))["bucket"] == 32
