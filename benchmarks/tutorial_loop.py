"""The seed tutorial's style-transfer loop, re-implemented faithfully: the benchmark's baseline.

Everything the seed (/work/shared/seed/neural_transfer_tutorial.md) does per pair is kept:
deep-copy the VGG features module, rebuild an nn.Sequential with Normalization, ContentLoss
(after conv_4) and StyleLoss (after conv_1..conv_5) modules inserted, recompute the targets,
then L-BFGS (defaults: lr 1, max_iter 20, history 100, no line search) driven by
`while run[0] <= num_steps: optimizer.step(closure)`, clamping inside the closure.

Two substitutions, both so the comparison is about the loop and not the inputs:
- The weights are our `vgg19-caffe` conv weights, placed in torchvision's vgg19().features
  layout; the Normalization module applies their caffe preprocessing (RGB->BGR, x255, minus
  the mean pixel), taken from nst_batch's own extractor, where the tutorial subtracts the
  ImageNet mean and divides by its std.
- Images come in already loaded as (1, 3, H, W) tensors in [0, 1]; the style has been resized
  to the content's exact H x W, as the tutorial's `assert style_img.size() == content_img.size()`
  forces its user to do.

Like the seed, the VGG parameters are left with requires_grad=True (the seed never freezes
them), so every backward pass also computes the weight gradients. `freeze_vgg=True` turns
that off, to show how much of the difference to nst-batch that one detail explains.
The seed's progress prints (every 50 steps) are left out.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nst_batch.core.vgg import VGGFeatures, _caffe_convs, build_layers

CONTENT_LAYERS = ["conv_4"]
STYLE_LAYERS = ["conv_1", "conv_2", "conv_3", "conv_4", "conv_5"]


def caffe_vgg19_features() -> nn.Sequential:
    """torchvision's vgg19().features (37 modules: conv, ReLU, max-pool) carrying the vgg19-caffe weights.

    Left trainable, as the seed's `models.vgg19(pretrained=True).features` is.
    """
    return nn.Sequential(*build_layers(_caffe_convs())).eval()


class Normalization(nn.Module):
    """The tutorial's Normalization slot, doing the weights' own preprocessing instead of ImageNet mean/std.

    Built from an nst_batch VGGFeatures so both sides feed the convolutions exactly the same
    numbers (for vgg19-caffe: RGB->BGR, x255, minus the mean pixel in BGR order).
    """

    def __init__(self, net: VGGFeatures):
        super().__init__()
        self.bgr = net.convention.bgr
        self.scale = net.convention.scale
        self.mean = net.mean.detach().clone()  # (1, 3, 1, 1), in the net's channel order, on the net's device
        self.std = net.std.detach().clone()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            img = img.flip(1)
        return (img * self.scale - self.mean) / self.std


class ContentLoss(nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target.detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(input, self.target)
        return input


def gram_matrix(input: torch.Tensor) -> torch.Tensor:
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class StyleLoss(nn.Module):
    def __init__(self, target_feature: torch.Tensor):
        super().__init__()
        self.target = gram_matrix(target_feature).detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


def get_style_model_and_losses(cnn: nn.Sequential, normalization: Normalization, style_img: torch.Tensor,
                               content_img: torch.Tensor):
    cnn = copy.deepcopy(cnn)
    content_losses: list[ContentLoss] = []
    style_losses: list[StyleLoss] = []
    model = nn.Sequential(normalization)
    i = 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            i += 1
            name = f"conv_{i}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu_{i}"
            layer = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d):
            name = f"pool_{i}"
        else:
            raise RuntimeError(f"Unrecognized layer: {layer.__class__.__name__}")
        model.add_module(name, layer)
        if name in CONTENT_LAYERS:
            target = model(content_img).detach()
            content_loss = ContentLoss(target)
            model.add_module(f"content_loss_{i}", content_loss)
            content_losses.append(content_loss)
        if name in STYLE_LAYERS:
            target_feature = model(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module(f"style_loss_{i}", style_loss)
            style_losses.append(style_loss)
    for i in range(len(model) - 1, -1, -1):
        if isinstance(model[i], (ContentLoss, StyleLoss)):
            break
    model = model[: (i + 1)]
    return model, style_losses, content_losses


def run_style_transfer(cnn: nn.Sequential, normalization: Normalization, content_img: torch.Tensor,
                       style_img: torch.Tensor,
                       num_steps: int = 300, style_weight: float = 1e6, content_weight: float = 1.0,
                       freeze_vgg: bool = False) -> tuple[torch.Tensor, dict]:
    """The seed's run_style_transfer, from content init. Returns (output image, info).

    info: `evals` (closure calls: the seed runs 16 x 20 = 320 for num_steps=300) and
    `first_loss` (the loss it computed at the content image, to cross-check the common evaluator).
    """
    input_img = content_img.clone()
    model, style_losses, content_losses = get_style_model_and_losses(cnn, normalization, style_img, content_img)
    if freeze_vgg:
        model.requires_grad_(False)  # what the current upstream tutorial does; acts on the deep copy only
    optimizer = torch.optim.LBFGS([input_img.requires_grad_()])
    run = [0]
    first: list[float] = []
    while run[0] <= num_steps:

        def closure():
            input_img.data.clamp_(0, 1)
            optimizer.zero_grad()
            model(input_img)
            style_score = 0
            content_score = 0
            for sl in style_losses:
                style_score += sl.loss
            for cl in content_losses:
                content_score += cl.loss
            style_score *= style_weight
            content_score *= content_weight
            loss = style_score + content_score
            loss.backward()
            run[0] += 1
            if not first:
                first.append(loss.item())
            return style_score + content_score

        optimizer.step(closure)

    input_img.data.clamp_(0, 1)
    return input_img.detach(), {"evals": run[0], "first_loss": first[0]}
