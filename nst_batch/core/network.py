"""Learned per-style networks: a feed-forward transformer trained once per style with the run's
own objective, then one forward pass a photo (Johnson, Alahi and Fei-Fei 2016, with the instance
normalisation of Ulyanov et al. 2016 and upsample-then-convolve instead of transposed convolutions).

Pure compute, like the engine: `train_steps` takes a `TrainState` (weights, Adam state, step, RNG) and
returns the next one; `state_dict`/`from_state_dict` turn it into plain tensors and back, and the
driver (run/training.py) writes them to OUT/models/<style>.pt. Resuming from a state gives the same weights an
uninterrupted run has at the same step (the crops come from the state's own generator).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from ..config.objective import Objective
from .vgg import VGGFeatures

# Bump when the architecture or the training recipe changes what a trained model computes: it is in
# every model's recipe, so models (and the pairs they made) from an older version are redone.
ARCH_VERSION = 1
TRAIN_BATCH = 4  # crops a training step
CROP_MAX = 256  # the crop's side at most: a 128 px run trains on crops of its whole short side
TRAIN_PHOTOS = 64  # photos a style's model trains on at most (an even sample of the collection)
LR = 1e-3  # Adam's, Johnson et al.'s
# Adam's first steps move every weight by about lr whatever its gradient: the small last layer would jump
# to a far worse image than the photo. The rate rises linearly over these steps (read from the step, so a
# resumed run does the same).
WARMUP = 50
_EPS = 1e-3  # the photo is kept off 0 and 1 before its logit


class _ConvIN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True):
        layers: list[nn.Module] = [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride),
                                   nn.InstanceNorm2d(cout, affine=True)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_ConvIN(c, c, 3), _ConvIN(c, c, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Up(nn.Sequential):
    """Nearest-neighbour upsampling, then a convolution: no checkerboard (Odena et al. 2016)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), _ConvIN(cin, cout, 3))


class TransformerNet(nn.Module):
    """32-64-128 channels, 5 residual blocks, back up to 3 channels. The output is a residual around the
    photo in logit space, so it is always inside (0, 1) and the untrained net is nearly the photo itself.
    Fully convolutional: any height and width (padded to a multiple of 4 by reflection, cropped back)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            _ConvIN(3, 32, 9), _ConvIN(32, 64, 3, 2), _ConvIN(64, 128, 3, 2),
            *[_Residual(128) for _ in range(5)],
            _Up(128, 64), _Up(64, 32),
            nn.ReflectionPad2d(4), nn.Conv2d(32, 3, 9))
        last = self.body[-1]
        with torch.no_grad():  # start near the photo: a small residual, not a random image
            last.weight.mul_(0.1)
            last.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        # Reflection needs the pad under the side; tiny odd images fall back to replication.
        mode = "reflect" if ph < h and pw < w else "replicate"
        padded = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
        r = self.body(padded)[..., :h, :w]
        return torch.sigmoid(torch.logit(x.clamp(_EPS, 1 - _EPS)) + r.float())


@dataclass
class TrainState:
    net: TransformerNet
    opt: torch.optim.Adam
    step: int
    gen: torch.Generator  # on the CPU: where each step's crops come from


def new_state(seed: int, device: torch.device) -> TrainState:
    torch.manual_seed(seed)  # the initial weights: nn.Module init draws from the global generator
    net = TransformerNet().to(device)
    return TrainState(net, torch.optim.Adam(net.parameters(), lr=LR), 0,
                      torch.Generator(device="cpu").manual_seed(seed))


def state_dict(state: TrainState) -> dict:
    """Plain tensors and numbers, on the CPU: what the driver saves (torch.save) as a checkpoint."""
    return {"arch": ARCH_VERSION, "step": state.step, "net": {k: v.detach().cpu() for k, v in state.net.state_dict().items()},
            "opt": state.opt.state_dict(), "rng": state.gen.get_state()}


def from_state_dict(d: dict, device: torch.device) -> TrainState:
    if d.get("arch") != ARCH_VERSION:
        raise ValueError(f"a model of architecture {d.get('arch')}, this nst-batch makes {ARCH_VERSION}")
    net = TransformerNet().to(device)
    net.load_state_dict(d["net"])
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    opt.load_state_dict(d["opt"])
    gen = torch.Generator(device="cpu")
    gen.set_state(d["rng"])
    return TrainState(net, opt, int(d["step"]), gen)


def crop_side(photos: list[torch.Tensor]) -> int:
    """The square crop a step trains on: the smallest photo's short side, at most CROP_MAX."""
    return min(CROP_MAX, *(min(p.shape[-2:]) for p in photos))


def _crops(photos: list[torch.Tensor], side: int, gen: torch.Generator, n: int = TRAIN_BATCH) -> torch.Tensor:
    out = []
    for _ in range(n):
        p = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        h, w = p.shape[-2:]
        y = int(torch.randint(h - side + 1, (1,), generator=gen))
        x = int(torch.randint(w - side + 1, (1,), generator=gen))
        c = p[..., y:y + side, x:x + side]
        if int(torch.randint(2, (1,), generator=gen)):
            c = c.flip(-1)
        out.append(c)
    return torch.cat(out)


def train_steps(state: TrainState, vgg: VGGFeatures, obj: Objective, photos: list[torch.Tensor],
                style: losses.Targets, until: int, autocast_dtype: torch.dtype | None = None,
                on_loss: Callable[[int, losses.LossTerms], None] | None = None,
                should_pause: Callable[[TrainState], bool] | None = None) -> TrainState:
    """Train `state` in place up to step `until` (Adam on TRAIN_BATCH random crops a step of `photos`,
    each (1, 3, H, W) in [0, 1] on the CPU, at the run's full size), with the run's objective: the crop is
    its own content target, `style` the style's targets at full size (a crop is a piece of a full-size
    photo, so its textures should match the full-size output's). `on_loss(step, terms)` hears each step's
    mean losses; `should_pause(state)` after each step lets the driver checkpoint. Returns `state`."""
    device = next(state.net.parameters()).device
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    side = crop_side(photos)
    state.net.train()
    while state.step < until:
        batch = _crops(photos, side, state.gen).to(device)
        with torch.no_grad(), amp:
            c_tgt = losses.content_targets(obj, vgg(batch, frozenset(obj.content_layers)))
        y = state.net(batch)
        with amp:
            feats = vgg(y, obj.layers)
        terms = losses.compute(obj, feats, y, c_tgt, style)
        loss = terms.total.mean()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"the training loss became {float(loss)} at step {state.step + 1}")
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in state.opt.param_groups:
            g["lr"] = LR * min(1.0, (state.step + 1) / WARMUP)
        state.opt.step()
        state.step += 1
        if on_loss:
            on_loss(state.step, losses.LossTerms(terms.content.detach(), terms.style.detach(), terms.tv.detach()))
        if should_pause and should_pause(state):
            break
    state.net.eval()
    return state


def held_crops(photos: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """A fixed set of `n` crops, drawn as training draws them but from a generator of their own: what
    `held_objective` measures a network on. One step's loss is no measure of progress: each step's crops
    differ, and a crop's loss differs up to 6x from another's (a flip alone turns a texture's orientation,
    which the Gram matrices see), far more than a few dozen steps change it."""
    return _crops(photos, crop_side(photos), torch.Generator(device="cpu").manual_seed(seed), n)


@torch.no_grad()
def held_objective(net: TransformerNet, vgg: VGGFeatures, obj: Objective, crops: torch.Tensor,
                   style: losses.Targets) -> float:
    """The training objective, mean over fixed `crops` (held_crops): comparable from one step to another."""
    device = next(net.parameters()).device
    crops = crops.to(device)
    c_tgt = losses.content_targets(obj, vgg(crops, frozenset(obj.content_layers)))
    y = net(crops)
    return float(losses.compute(obj, vgg(y, obj.layers), y, c_tgt, style).total.mean())


@torch.no_grad()
def apply(net: TransformerNet, content: torch.Tensor) -> torch.Tensor:
    """Stylize a batch (B, 3, H, W) in [0, 1], any H and W, in one forward pass; the same shape back."""
    net.eval()
    return net(content).clamp(0, 1)
