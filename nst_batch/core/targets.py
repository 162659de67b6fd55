"""Style targets: each style's Gram targets computed once per working size and kept (least recently used
dropped first), a blend's as the weighted sum of its members', and for `colors: preserve` or `match` the
targets of the style made to suit each photo.

Pixels come from the I/O side through a `StylePixels` provider, `(key, long_side) -> (1, 3, h, w)` in
[0, 1] on the CPU: the style whose cache key (its file's hash) is `key`, resized so that its long side is
`long_side` or more (the provider keeps its short side at VGG's minimum; Gram matrices do not depend on
the image size). A provider that cannot decode the style raises its PairError.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from . import colors, losses

# Styles whose Gram targets the engine keeps, least recently used dropped first. Plans run photo by
# photo (each photo decoded once for all its styles), so every style of a run comes back once per photo:
# keep them all, up to this bound. Measured for one style, gatys: targets 2.33 MiB a scale whatever the
# image size (4.66 MiB at scales [0.5, 1.0]), so 64 styles hold at most ~300 MB.
STYLE_CACHE = 64

StylePixels = Callable[[str, int], torch.Tensor]
TargetsOf = Callable[[torch.Tensor], losses.Targets]  # style image(s) on the device -> their targets
Weighted = Sequence[tuple[str, float]]  # (style key, weight): a blend's members


class StyleTargets:
    """The style-target cache: style key -> {long side: targets}, for the STYLE_CACHE most recent styles
    (a blend's key holds the blend's; its members are kept under their own keys)."""

    def __init__(self, pixels: StylePixels, targets_of: TargetsOf, device: torch.device):
        self.pixels, self.targets_of, self.device = pixels, targets_of, device
        self._held: OrderedDict[str, dict[int, losses.Targets]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._held

    def keys(self) -> list[str]:
        return list(self._held)

    def _slot(self, key: str) -> dict[int, losses.Targets]:
        if key not in self._held:
            while len(self._held) >= STYLE_CACHE:
                self._held.popitem(last=False)
            self._held[key] = {}
        return self._held[key]

    def style(self, key: str, long_side: int) -> losses.Targets:
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            if long_side in held:
                return held[long_side]
        image = self.pixels(key, long_side)
        side = max(image.shape[-2:])  # more than long_side where the style's short side needed it
        held = self._slot(key)
        if side not in held:
            held[side] = self.targets_of(image.to(self.device))
        held[long_side] = held[side]  # asked for by the requested size next time (objective and weights are the engine's own)
        return held[side]

    def blend(self, members: Weighted, blend_key: str, long_side: int) -> losses.Targets:
        """A blend's targets: the weighted sum of its members' Gram targets, each member at the same
        working long side (the cache keeps the members' and the blend's)."""
        held = self._held.get(blend_key)
        if held is not None and long_side in held:
            self._held.move_to_end(blend_key)
            return held[long_side]
        targets = losses.blend([self.style(k, long_side) for k, _ in members], [w for _, w in members])
        self._slot(blend_key)[long_side] = targets
        return targets

    def for_photo(self, members: Weighted, long_side: int, photo: torch.Tensor, mode: str) -> losses.Targets:
        """Targets of the style (each member of a blend, then blended) made to suit each photo of `photo`
        (B, 3, H, W) for `colors: preserve` or `match` (colors.for_style): batch B, one per photo. Not
        cached: they depend on the photo, and a run makes each (photo, style) pair once, so a cache keyed
        by both would never be hit again; they cost one forward pass per scale, next to the hundreds of
        steps of the pair itself."""
        parts = [self.targets_of(colors.for_style(self.pixels(k, long_side).to(self.device), photo, mode))
                 for k, _ in members]
        return losses.blend(parts, [w for _, w in members])
