"""The batched per-image L-BFGS (nst_batch/core/lbfgs.py): convergence, independence of batch companions, no host
read inside a chunk, the masks, NaN isolation, and two tiny runs on the real VGG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nst_batch.config.objective import PRESETS
from nst_batch.core import lbfgs, losses
from nst_batch.core.vgg import load_vgg19

from conftest import HostReads

SHAPE = (1, 2, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def quad(target: torch.Tensor, curv: torch.Tensor, scale: float = 1.0):
    """Per-image separable quadratic sum(curv·(x - target)²)·scale: (B,). Its minimum over [0, 1] is the
    target clamped into the box."""
    return lambda x: (curv * (x - target) ** 2).flatten(1).sum(1) * scale


def problem(seed: int, b: int = 1, lo: float = 1.0, hi: float = 1e3):
    """b random quadratics whose curvatures span lo..hi (ill-conditioned), targets partly outside the box."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, *SHAPE[1:], generator=g) * 1.2 - 0.1
    curv = lo * (hi / lo) ** torch.rand(b, *SHAPE[1:], generator=g)
    return target, curv


def test_quadratics_with_different_curvatures_each_reach_their_own_minimum():
    targets, curvs = zip(*(problem(s, lo=lo, hi=hi) for s, (lo, hi) in enumerate([(1, 1), (1, 1e2), (1e2, 1e5)])))
    target, curv = torch.cat(targets), torch.cat(curvs)
    r = lbfgs.minimize(torch.full((3, *SHAPE[1:]), 0.5), lbfgs.value_and_grad(quad(target, curv)), steps=200)
    err = (r.images - target.clamp(0, 1)).abs().flatten(1).max(1).values
    assert err.max() < 1e-4, err
    assert r.evaluations == 200 and r.losses.shape == (200, 3)


def rosenbrock(b: torch.Tensor):
    """Per image, a sum of 2-D Rosenbrock valleys in u = 4x - 2 (minimum at u = 1: x = 0.75), steepness b (B,)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        u = (4 * x - 2).flatten(1)
        p, q = u[:, 0::2], u[:, 1::2]
        return ((1 - p) ** 2 + b[:, None] * (q - p * p) ** 2).sum(1)
    return fn


def test_rosenbrock_valleys_converge():
    b = torch.tensor([100.0, 10.0, 1000.0])
    r = lbfgs.minimize(torch.full((3, *SHAPE[1:]), 0.25), lbfgs.value_and_grad(rosenbrock(b)), steps=600)
    assert (r.images - 0.75).abs().max() < 2e-3, r.images.flatten(1)


def test_an_image_gets_the_same_result_whatever_its_companions():
    """Companions with other curvatures and losses 1e13 or 1e-6 times as large: the image's own result is
    bitwise the same (its own step length, history and normalisation)."""
    t0, c0 = problem(0, hi=1e3)
    alone = lbfgs.minimize(torch.full(SHAPE, 0.5), lbfgs.value_and_grad(quad(t0, c0)), steps=40).images[0]
    for seeds, scale in [((1, 2), 1e13), ((3, 4), 1e-6)]:
        ts, cs = zip(*(problem(s, lo=10, hi=1e5) for s in seeds))
        target, curv = torch.cat([t0, *ts]), torch.cat([c0, *cs])
        weights = torch.tensor([1.0, scale, 1.0]).view(3, 1, 1, 1)
        x0 = torch.cat([torch.full(SHAPE, 0.5), torch.rand(2, *SHAPE[1:])])
        fn = lambda x, target=target, curv=curv, weights=weights: quad(target, curv * weights)(x)
        together = lbfgs.minimize(x0, lbfgs.value_and_grad(fn), steps=40).images[0]
        assert (together - alone).abs().max() <= 1e-6


def test_a_loss_scaled_by_1e13_is_optimised_like_the_unscaled_one():
    """The per-image normalisation: the tutorial weights start near 1e13, and nothing may overflow or stall."""
    t, c = problem(5, hi=1e3)
    a = lbfgs.minimize(torch.full(SHAPE, 0.5), lbfgs.value_and_grad(quad(t, c)), steps=120)
    b = lbfgs.minimize(torch.full(SHAPE, 0.5), lbfgs.value_and_grad(quad(t, c, 1e13)), steps=120)
    for r in (a, b):  # (not bitwise alike: x·1e13/1e13 rounds)
        assert (r.images - t.clamp(0, 1)).abs().max() < 1e-3
    assert torch.equal(b.losses.isfinite(), torch.ones_like(b.losses, dtype=torch.bool))


def test_the_first_step_moves_each_value_by_about_one_percent():
    t = torch.rand(SHAPE, generator=torch.Generator().manual_seed(6))
    ev = lbfgs.value_and_grad(quad(t, torch.ones(SHAPE)))
    st = lbfgs.init_state(torch.full(SHAPE, 0.5), ev)
    x0 = st.x.clone()
    lbfgs.step(st, ev)
    assert (st.x - x0).abs().mean() == pytest.approx(lbfgs.FIRST_STEP, rel=0.01)




def test_no_host_read_inside_a_chunk_and_few_per_minimize(monkeypatch):
    target, curv = problem(7, b=3)
    ev = lbfgs.value_and_grad(quad(target, curv))
    st = lbfgs.init_state(torch.full((3, *SHAPE[1:]), 0.5), ev, window=5)
    reads = HostReads(monkeypatch)
    lbfgs.run_chunk(st, ev, 12, window=5, tolerance=1e-3)
    assert reads.count == 0
    r = lbfgs.minimize(torch.full((3, *SHAPE[1:]), 0.5), ev, steps=81, chunk=10, stop_window=200, stop_tolerance=0.0)
    assert r.evaluations == 81 and 0 < reads.count / r.evaluations <= 0.25
    monkeypatch.undo()
    assert (reads.count, r.steps.tolist()) == (8, [81] * 3)  # one read per chunk; none stopped early


def test_a_frozen_image_does_not_move_while_the_others_do():
    target, curv = problem(8, b=3)
    ev = lbfgs.value_and_grad(quad(target, curv))
    st = lbfgs.init_state(torch.full((3, *SHAPE[1:]), 0.5), ev)
    st.done[1] = True
    x0, best0 = st.x.clone(), st.best_x.clone()
    lbfgs.run_chunk(st, ev, 5)
    assert torch.equal(st.x[1], x0[1]) and torch.equal(st.best_x[1], best0[1])
    assert not torch.equal(st.x[0], x0[0]) and not torch.equal(st.x[2], x0[2])
    assert st.steps.tolist() == [6, 1, 6]


def test_a_rejected_step_keeps_x_and_halves_t_for_that_image_only():
    """Image 1 sits 0.001 from its minimum: the 1% first step overshoots, fails Armijo, is rejected."""
    target = torch.cat([torch.full(SHAPE, 0.2), torch.full(SHAPE, 0.501)])
    ev = lbfgs.value_and_grad(quad(target, torch.ones(2, *SHAPE[1:])))
    st = lbfgs.init_state(torch.full((2, *SHAPE[1:]), 0.5), ev)
    x0 = st.x.clone()
    lbfgs.step(st, ev)
    assert torch.equal(st.x[1], x0[1]) and st.t[1] == lbfgs.SHRINK and st.rho[:, 1].eq(0).all()
    assert not torch.equal(st.x[0], x0[0]) and st.t[0] == 1 and st.rho[:, 0].ne(0).sum() == 1
    lbfgs.run_chunk(st, ev, 30)
    assert (st.best_x - target.flatten(1)).abs().max() < 1e-4


def test_the_stop_rule_freezes_each_image_on_its_own():
    """Image 0 is at its minimum from the start (its loss cannot move); image 1 has far to go."""
    target = torch.cat([torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.9)])
    ev = lbfgs.value_and_grad(quad(target, torch.ones(2, *SHAPE[1:])))
    r = lbfgs.minimize(torch.full((2, *SHAPE[1:]), 0.5), ev, steps=100, chunk=4, stop_window=3, stop_tolerance=0.01)
    assert r.steps[0] == 4 and 4 < r.steps[1] < 100  # 1 + window, then the rule fires
    assert r.evaluations < 100  # the batch ended once both had stopped


def test_a_nan_in_one_image_poisons_neither_the_others_nor_its_best_image():
    t, c = problem(9, b=3)
    ok = quad(t, c)

    def fn(x: torch.Tensor) -> torch.Tensor:
        f = ok(x)
        # Image 1: NaN once its mean falls below 0.45 (on the way to its minimum); image 2: NaN everywhere.
        nan = torch.tensor(float("nan"))
        return torch.stack([f[0], torch.where(x[1].mean() < 0.45, nan, f[1]), f[2] * nan])

    x0 = torch.full((3, *SHAPE[1:]), 0.5)
    r = lbfgs.minimize(x0, lbfgs.value_and_grad(fn), steps=60)
    alone = lbfgs.minimize(x0[:1], lbfgs.value_and_grad(quad(t[:1], c[:1])), steps=60)
    assert torch.equal(r.images[0], alone.images[0])
    assert torch.isfinite(r.images).all() and r.images[1].mean() >= 0.45 and torch.equal(r.images[2], x0[2])
    assert r.losses[-1, 1] < r.losses[0, 1] and torch.isfinite(r.losses[:, :2]).all()


# -- the real VGG, tiny --------------------------------------------------------------------------------------

def photo(h: int, w: int, seed: int) -> torch.Tensor:
    """Random detail at half resolution, upsampled. (Smoother images have near-ties in VGG's max pools
    everywhere: a 1e-6 change of the input then moves the gradient by 1%, measured, and the rounding
    differences of a batched convolution grow into visible ones within 12 steps, whatever the optimiser.)"""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, h // 2, w // 2, generator=g), size=(h, w), mode="bilinear").clamp(0, 1)


def vgg_objective(net, obj, contents: torch.Tensor, style: torch.Tensor):
    with torch.no_grad():
        c_tgt = losses.content_targets(obj, net(contents, frozenset(obj.content_layers)))
        s_tgt = losses.style_targets(obj, net(style, frozenset(obj.style_layers)))
    return lambda x: losses.compute(obj, net(x, obj.layers), x, c_tgt, s_tgt).total


@pytest.fixture(scope="module")
def caffe_net():
    return load_vgg19("vgg19-caffe", "relu5_1")


def test_vgg_an_image_gets_the_same_result_alone_and_with_any_companions(caffe_net):
    obj = PRESETS["gatys"]
    contents, style = torch.cat([photo(32, 40, s) for s in range(5)]), photo(40, 40, 10)
    runs = []
    for idx in ([0, 1, 2], [0, 3, 4], [0]):
        fn = vgg_objective(caffe_net, obj, contents[idx], style)
        runs.append(lbfgs.minimize(contents[idx], lbfgs.value_and_grad(fn), steps=12))
    assert torch.equal(runs[0].images[0], runs[1].images[0])  # a batch of the same size: bitwise
    assert (runs[0].images[0] - runs[2].images[0]).abs().max() <= 2 / 255  # alone: the convolution rounds otherwise
    assert float(runs[0].losses[-1, 0] / runs[0].losses[0, 0]) < 0.5  # it did optimise


def test_vgg_tutorial_weights_recover(caffe_net):
    """The tutorial preset (style 1e6, Caffe VGG: a loss near 1e8-1e13) converges instead of diverging."""
    obj = PRESETS["tutorial"]
    x0 = photo(40, 40, 4)
    fn = vgg_objective(caffe_net, obj, x0, photo(40, 40, 11))
    r = lbfgs.minimize(x0, lbfgs.value_and_grad(fn), steps=20)
    assert torch.isfinite(r.losses).all() and float(r.losses[-1, 0] / r.losses[0, 0]) < 0.2
    assert (r.losses[1:] <= r.losses[:-1]).all()  # accepted losses never rise
