"""Colour controls (`colors: style | preserve | match`): the pure colour arithmetic, on torch tensors.

Every image here is (B, 3, H, W) RGB in [0, 1], or (B, 1, H, W) for a luminance; nothing is cached or
written. The engine calls three functions around `pyramid.stylize`, which stays colour-blind:
`for_content` (what the optimiser starts from and keeps the structure of), `for_style` (what the style's
Gram targets are computed from) and `finish` (the output image from what the optimiser made).

- `style`: nothing changes; the output takes the painting's colours (Gatys et al. 2016).
- `preserve`: luminance-only transfer (Gatys et al. 2017, "Controlling Perceptual Factors in Neural
  Style Transfer", section 5): the photo and the style become luminance images (replicated to three
  channels for VGG), the style's luminance mean and standard deviation are matched to the photo's,
  the luminance is optimised, and the result is recombined with the photo's chroma.
- `match`: the style image is recoloured to the photo's colour statistics (mean and covariance of its
  RGB pixels, the same paper's "colour histogram matching", with the symmetric square roots of the
  covariances) before its Gram targets are computed; the optimisation is then the usual one.

Colour space: YCbCr, full range (ITU-R BT.601 as JPEG uses it), rather than the paper's YIQ. Y is the
same in both (0.299 R + 0.587 G + 0.114 B), and in both a change of Y alone moves a pixel along the grey
axis, so recombining a luminance with the photo's chroma gives the same RGB in either space. YCbCr is the
one Pillow implements, so a test checks these conversions against an independent implementation.
"""

from __future__ import annotations

import torch

COLORS = ("style", "preserve", "match")

# Rows: Y, Cb, Cr from R, G, B (ITU-R T.871, the JPEG file format's full-range YCbCr). Cb and Cr are
# centred on 0.5 so that every RGB colour in [0, 1] has its YCbCr in [0, 1] too.
_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]], dtype=torch.float64)
_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
# The matrix's exact inverse (its R row is 1, 0, 1.402: a change of Y alone is a change along grey).
_RGB = torch.linalg.inv(_YCBCR)

# The least variance a style's colour direction is taken to have before the inverse square root (a std
# of 0.01, 2.5/255): a grey painting has no chroma variance at all, and 1/sqrt(0) would be infinite.
COV_EPS = 1e-4
# The smallest luminance std divided by: a flat style (a single tone) keeps its mean only.
STD_EPS = 1e-4


def _mix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channels of (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", m.to(x.dtype, copy=False).to(x.device), x)


def _offset(x: torch.Tensor) -> torch.Tensor:
    return _OFFSET.to(x.device, x.dtype).view(1, 3, 1, 1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> YCbCr, full range, every channel in [0, 1] for RGB in [0, 1]."""
    return _mix(rgb, _YCBCR) + _offset(rgb)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_ycbcr` (not clamped: a luminance put with another image's chroma can leave
    the RGB cube)."""
    return _mix(ycc - _offset(ycc), _RGB)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) Y."""
    return rgb_to_ycbcr(rgb)[:, :1]


def as_rgb(y: torch.Tensor) -> torch.Tensor:
    """A luminance (B, 1, H, W) as the grey RGB image VGG takes: Y in each of the three channels."""
    return y.expand(-1, 3, -1, -1).contiguous()


def match_luminance(style_y: torch.Tensor, photo_y: torch.Tensor) -> torch.Tensor:
    """The style's luminance with the photo's mean and standard deviation (Gatys et al. 2017, eq. 5):
    (Ys - mean_s) * std_p / std_s + mean_p, per image. style_y (1 or B, 1, h, w), photo_y (B, 1, H, W)
    of any size: the result has the photo's batch and the style's size."""
    ms, ss = style_y.mean((1, 2, 3), keepdim=True), style_y.std((1, 2, 3), keepdim=True)
    mp, sp = photo_y.mean((1, 2, 3), keepdim=True), photo_y.std((1, 2, 3), keepdim=True)
    return (style_y - ms) * (sp / ss.clamp_min(STD_EPS)) + mp


def mean_cov(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, 3) and covariance (B, 3, 3) of the RGB pixels of each image, in float64."""
    flat = rgb.flatten(2).double()
    mean = flat.mean(2)
    d = flat - mean.unsqueeze(2)
    return mean, d @ d.transpose(1, 2) / max(1, flat.shape[2] - 1)


def _sym_pow(cov: torch.Tensor, p: float, floor: float = 0.0) -> torch.Tensor:
    """cov^p for symmetric positive semi-definite matrices, by eigendecomposition (torch.linalg.eigh:
    `torch.eig`, which older ports used, is gone from PyTorch). Eigenvalues are raised to `floor` first
    (below 0 they are rounding)."""
    vals, vecs = torch.linalg.eigh(cov)
    return vecs @ torch.diag_embed(vals.clamp_min(floor) ** p) @ vecs.transpose(-1, -2)


def match_colors(style: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """The style recoloured to the photo's colour statistics: x' = A (x - mean_s) + mean_p with
    A = cov_p^1/2 cov_s^-1/2, so x' has the photo's mean and covariance. style (1 or B, 3, h, w),
    photo (B, 3, H, W): the result has the photo's batch and the style's size; not clamped to [0, 1].

    A near-singular style covariance (a grey painting has no chroma variance) has its eigenvalues
    raised to COV_EPS before the inverse square root: its flat directions stay nearly flat instead of
    amplifying noise without bound (or 1/0). Such a painting takes the photo's mean colour but cannot
    take its chroma spread. Any other style's covariance is left exact."""
    ms, cs = mean_cov(style)
    mp, cp = mean_cov(photo)
    a = _sym_pow(cp, 0.5) @ _sym_pow(cs, -0.5, COV_EPS)  # (B, 3, 3)
    flat = style.flatten(2).double() - ms.unsqueeze(2)
    out = a @ flat + mp.unsqueeze(2)
    return out.view(out.shape[0], 3, *style.shape[-2:]).to(style.dtype)


def for_content(photo: torch.Tensor, mode: str) -> torch.Tensor:
    """The image the optimiser keeps the structure of (and starts from): the photo's luminance, as grey
    RGB, for `preserve`; the photo itself otherwise."""
    return as_rgb(luminance(photo)) if mode == "preserve" else photo


def for_style(style: torch.Tensor, photo: torch.Tensor, mode: str) -> torch.Tensor:
    """The image the style's Gram targets are computed from. style (1, 3, h, w), photo (B, 3, H, W):
    for `preserve` and `match` one per photo (B, 3, h, w), each inside [0, 1]; the style itself for `style`."""
    if mode == "preserve":
        return as_rgb(match_luminance(luminance(style), luminance(photo)).clamp(0, 1))
    if mode == "match":
        return match_colors(style, photo).clamp(0, 1)
    if mode == "style":
        return style
    raise ValueError(f"colors {mode!r}: expected one of {', '.join(COLORS)}")


def recombine(y: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """RGB from a luminance (B, 1, H, W) and the photo's chroma (its Cb and Cr), clamped to [0, 1]."""
    return ycbcr_to_rgb(torch.cat([y, rgb_to_ycbcr(photo)[:, 1:]], 1)).clamp(0, 1)


def finish(output: torch.Tensor, photo: torch.Tensor, mode: str) -> torch.Tensor:
    """The image to write from what the optimiser made: for `preserve` its luminance with the photo's
    chroma (the three channels of the optimised grey image may have drifted a little apart: only their
    luminance is kept); the optimiser's image otherwise. photo: the full-size photo, same shape."""
    return recombine(luminance(output), photo) if mode == "preserve" else output
