"""What the optimisation minimises, by name: VGG19's layer names, the presets, and `Objective`.

The one home of `layers`. Torch-free, so the manifest checks a `layers` key without loading torch;
`vgg` builds the network from these names and `losses` computes the objective.

Layers are named the way papers name them (conv1_1, relu1_1, pool1, ...). The seed tutorial
numbers convolutions sequentially (conv_1 .. conv_16, relu_N, pool_N); those names are accepted
and mapped, so `conv_4` is `conv2_2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BLOCKS = (2, 2, 4, 4, 4)  # convolutions per block in VGG19
CHANNELS = (64, 128, 256, 512, 512)
# An image's smallest side: VGG19 pools 4 times before conv5_1, and smaller images have no conv5 features.
MIN_SIDE = 16


def _layer_names() -> list[str]:
    names = []
    for b, n in enumerate(BLOCKS, start=1):
        for i in range(1, n + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return names


LAYERS = _layer_names()  # index i here == index i in torchvision's vgg19().features
CONVS = [n for n in LAYERS if n.startswith("conv")]


def canonical_layer(name: str) -> str:
    """'relu4_2' -> 'relu4_2'; tutorial-style 'conv_4' -> 'conv2_2'. ValueError for anything else."""
    if name in LAYERS:
        return name
    m = re.fullmatch(r"(conv|relu|pool)_(\d+)", name)
    if m and 1 <= int(m.group(2)) <= len(CONVS):
        conv = CONVS[int(m.group(2)) - 1]
        kind = m.group(1)
        if kind == "conv":
            return conv
        if kind == "relu":
            return "relu" + conv[4:]
        # The tutorial names a pool after the conv count so far; only pools right after a block's last conv exist.
        b, i = map(int, conv[4:].split("_"))
        if i == BLOCKS[b - 1]:
            return f"pool{b}"
    raise ValueError(f"unknown VGG19 layer {name!r} (use names like relu4_2, conv1_1, pool2 or the tutorial's conv_4)")


class LayersError(ValueError):
    """A `layers` value that names no preset or no VGG19 layer; `part` is 'content', 'style' or ''."""

    def __init__(self, message: str, part: str = ""):
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class Layers:
    """The manifest's `layers`, resolved: a preset's name, or content and style layer lists."""

    content: tuple[str, ...]
    style: tuple[str, ...]
    preset: str | None = None  # 'gatys' or 'tutorial'; None for a mapping

    @staticmethod
    def parse(value: Any) -> "Layers":
        if isinstance(value, Layers):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise LayersError(f"must be a preset ({', '.join(PRESETS)}) or a mapping, got {value!r}")
            p = PRESETS[value]
            return Layers(p.content_layers, p.style_layers, value)
        if isinstance(value, dict):
            if set(value) - {"content", "style"} or not value.get("style") or not value.get("content"):
                raise LayersError("as a mapping needs exactly 'content' and 'style' lists of layer names "
                                  "(e.g. content: [relu4_2], style: [relu1_1, relu2_1])")
            parts = {}
            for part in ("content", "style"):
                names = value[part] if isinstance(value[part], (list, tuple)) else [value[part]]
                try:
                    parts[part] = tuple(canonical_layer(str(n)) for n in names)
                except ValueError as e:
                    raise LayersError(str(e), part) from None
            return Layers(parts["content"], parts["style"])
        raise LayersError(f"must be a preset ({', '.join(PRESETS)}) or a mapping, got {value!r}")

    def to_manifest(self) -> str | dict[str, list[str]]:
        """As a manifest writes it: the preset's name, or the mapping of canonical names."""
        return self.preset or {"content": list(self.content), "style": list(self.style)}


@dataclass(frozen=True)
class Objective:
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    content_weight: float
    style_weight: float
    tv_weight: float
    normalization: str  # "relative" or "tutorial" (see losses)

    @property
    def layers(self) -> frozenset[str]:
        return frozenset(self.content_layers + self.style_layers)

    @property
    def last_layer(self) -> str:
        return max(self.layers, key=LAYERS.index)


PRESETS = {
    # Gatys et al. 2016: content relu4_2, style relu1_1..relu5_1 equally weighted.
    "gatys": Objective(("relu4_2",), ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
                       content_weight=1.0, style_weight=3.0, tv_weight=0.5, normalization="relative"),
    # The seed tutorial: conv_4 content, conv_1..conv_5 style (pre-ReLU), weights 1 / 1e6.
    "tutorial": Objective(("conv2_2",), ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"),
                          content_weight=1.0, style_weight=1e6, tv_weight=0.0, normalization="tutorial"),
}
GATYS = Layers.parse("gatys")


def objective_from(layers: Layers | str | dict, content_weight: float | None = None,
                   style_weight: float | None = None, tv_weight: float | None = None) -> Objective:
    """The objective of `layers` (a mapping takes the gatys weights and normalisation) with overrides."""
    spec = Layers.parse(layers)
    base = PRESETS[spec.preset or "gatys"]
    return Objective(
        spec.content, spec.style,
        base.content_weight if content_weight is None else content_weight,
        base.style_weight if style_weight is None else style_weight,
        base.tv_weight if tv_weight is None else tv_weight,
        base.normalization,
    )
