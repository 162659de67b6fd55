"""Colour controls (`colors: style | preserve | match`): the colour arithmetic against Pillow and against
its own definitions, and what each mode does to real outputs of the real VGG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst_batch.core import colors
from nst_batch.files import decode
from nst_batch.files.decode import to_tensor
from nst_batch.config.manifest import Settings
from nst_batch.config.manifest import Member

from conftest import engine_of, path_job

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _photo(seed: int = 0, h: int = 24, w: int = 32) -> torch.Tensor:
    """Random colours with a cast (a warm photo): channels of different means and spreads, correlated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, h, w, generator=g)
    return (0.6 * base + 0.4 * torch.rand(1, 3, h, w, generator=g)) * torch.tensor([0.9, 0.6, 0.35]).view(1, 3, 1, 1)


# -- the conversions ---------------------------------------------------------------------------------


def test_ycbcr_round_trips_and_agrees_with_pillow():
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(colors.ycbcr_to_rgb(colors.rgb_to_ycbcr(x)), x, atol=1e-6)
    ycc = colors.rgb_to_ycbcr(x)
    assert ycc.min() >= 0 and ycc.max() <= 1  # every RGB colour has its YCbCr inside [0, 1]
    # Pillow's own full-range YCbCr (JPEG's), an independent implementation, in 8 bits.
    rgb8 = (x[0] * 255).round().byte().permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(rgb8, "RGB").convert("YCbCr"), dtype=np.float64) / 255
    ours = colors.rgb_to_ycbcr(torch.from_numpy(rgb8).permute(2, 0, 1)[None].double() / 255)[0].permute(1, 2, 0)
    assert np.abs(ours.numpy() - pil).max() <= 1.01 / 255  # Pillow rounds to 8 bits
    # Grey stays grey: zero chroma (0.5, centred), Y the grey level.
    grey = torch.full((1, 3, 2, 2), 0.3)
    assert torch.allclose(colors.rgb_to_ycbcr(grey)[0, :, 0, 0], torch.tensor([0.3, 0.5, 0.5]), atol=1e-6)


def test_a_luminance_with_the_photos_own_chroma_is_the_photo_and_a_new_one_moves_along_grey():
    photo = _photo()
    assert torch.allclose(colors.recombine(colors.luminance(photo), photo), photo, atol=1e-6)
    y = colors.luminance(photo) + 0.05
    out = colors.recombine(y, photo)
    inside = (photo + 0.05 <= 1).all(1)  # unclamped pixels: the same RGB shift in each channel
    assert torch.allclose((out - photo)[:, :, inside[0]], torch.tensor(0.05), atol=1e-5)
    assert torch.allclose(colors.rgb_to_ycbcr(out)[:, 1:], colors.rgb_to_ycbcr(photo)[:, 1:], atol=1e-6)


def test_match_luminance_takes_the_photos_mean_and_spread():
    style_y = colors.luminance(torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(2)))
    photo_y = colors.luminance(torch.cat([_photo(3), _photo(4) * 0.5]))
    out = colors.match_luminance(style_y, photo_y)
    assert out.shape == (2, 1, 30, 30)  # one per photo, at the style's size
    assert torch.allclose(out.mean((1, 2, 3)), photo_y.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(out.std((1, 2, 3)), photo_y.std((1, 2, 3)), atol=1e-6)
    flat = colors.match_luminance(torch.full((1, 1, 8, 8), 0.7), photo_y)  # one tone: no 0/0
    assert torch.isfinite(flat).all() and torch.allclose(flat.mean((1, 2, 3)), photo_y.mean((1, 2, 3)), atol=1e-4)


# -- match: mean and covariance ----------------------------------------------------------------------


def test_match_colors_gives_the_style_the_photos_mean_and_covariance():
    style = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(5)) ** 2  # another palette
    photos = torch.cat([_photo(6), _photo(7).flip(1)])  # two photos, two different casts
    out = colors.match_colors(style, photos)
    assert out.shape == (2, 3, 20, 28)
    mean, cov = colors.mean_cov(out)
    pmean, pcov = colors.mean_cov(photos)
    assert torch.allclose(mean, pmean, atol=1e-5) and torch.allclose(cov, pcov, atol=1e-6)
    assert not torch.allclose(colors.mean_cov(style)[1], pcov[:1], atol=1e-3)  # it was not so already
    # The structure is the style's: a linear map of its pixels, so its pixel order is kept.
    corr = torch.corrcoef(torch.stack([colors.luminance(style).flatten(), colors.luminance(out[:1]).flatten()]))
    assert corr[0, 1] > 0.5


def test_a_grey_painting_is_recoloured_without_nan():
    """A grey style's covariance is singular (rank 1): its inverse square root must not blow up."""
    g = torch.Generator().manual_seed(8)
    grey = torch.rand(1, 1, 16, 16, generator=g).expand(1, 3, 16, 16)
    photo = _photo(9)
    for style in (grey, grey + 1e-4 * torch.rand(1, 3, 16, 16, generator=g), torch.full((1, 3, 16, 16), 0.5)):
        out = colors.match_colors(style, photo)
        assert torch.isfinite(out).all()
        assert torch.allclose(colors.mean_cov(out)[0], colors.mean_cov(photo)[0], atol=1e-5)  # the photo's cast
        assert out.std() < 1.0  # no amplified noise
    for mode in colors.COLORS:
        got = colors.for_style(grey, photo, mode)
        assert torch.isfinite(got).all() and got.min() >= 0 and got.max() <= 1


# -- on real outputs ---------------------------------------------------------------------------------


def _make(mode: str, photos: list[str]) -> list:
    s = Settings(content=ROOT / "data/content", styles=ROOT / "data/styles", size=48, steps=6, log_every=2,
                 scales=(1.0,), device="cpu", layers=LAYERS, style_weight=30.0, colors=mode)
    engine = engine_of(s)
    made = engine.make([path_job(engine, ROOT / "data/content" / p, ROOT / "data/styles/starry_night.jpg")
                        for p in photos])
    assert all(m.ok for m in made), [m.error for m in made]
    assert all(m.final.total < m.start.total for m in made)  # each optimised (its own objective)
    return [m.image for m in made]


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    """The cat restyled after Starry Night (blue and yellow) in each mode; for `match` a second photo
    (the coffee cup) made after it by the same engine."""
    (style,) = _make("style", ["chelsea.jpg"])
    (preserve,) = _make("preserve", ["chelsea.jpg"])
    match, coffee = _make("match", ["chelsea.jpg", "coffee.jpg"])
    return {"style": style, "preserve": preserve, "match": match, "coffee_after_chelsea": coffee}


def _chroma(x: torch.Tensor) -> torch.Tensor:
    return colors.rgb_to_ycbcr(x)[:, 1:]


def test_preserve_keeps_the_photos_colours_and_takes_the_styles_luminance(outputs):
    photo = to_tensor(decode.load_rgb(ROOT / "data/content/chelsea.jpg"), 48)
    out, style = outputs["preserve"], outputs["style"]
    assert out.shape == photo.shape
    off = (_chroma(out) - _chroma(photo)).abs()
    assert off.mean() < 1e-3 and off.max() < 0.02  # only where the new luminance meets the RGB cube's edge
    assert (_chroma(style) - _chroma(photo)).abs().mean() > 0.02  # `style` does take the painting's colours
    assert (colors.luminance(out) - colors.luminance(photo)).abs().mean() > 0.01  # it was stylized


def test_match_recolours_the_style_to_each_photo(outputs):
    photo = to_tensor(decode.load_rgb(ROOT / "data/content/chelsea.jpg"), 48)
    out, style = outputs["match"], outputs["style"]
    assert (out - style).abs().mean() > 0.02
    # Starry Night's blue pulls `style`'s mean colour away from the cat's; `match`'s stays near it.
    pmean = colors.mean_cov(photo)[0]
    assert (colors.mean_cov(out)[0] - pmean).abs().max() < 0.5 * (colors.mean_cov(style)[0] - pmean).abs().max()
    # The targets depend on the photo: a second photo made after the first by the same engine (whose
    # style cache holds Starry Night) is the one a fresh engine makes for it alone.
    (alone,) = _make("match", ["coffee.jpg"])
    assert torch.equal(outputs["coffee_after_chelsea"], alone)


def test_preserve_set_per_style_on_a_blend_keeps_the_photos_colours():
    """`colors` through per_style (a Job's overrides) on a blend: each member made to suit the photo, then blended,
    and the photo's chroma put back; the engine's own setting (`style`) is untouched for other jobs."""
    s = Settings(content=ROOT / "data/content", styles=ROOT / "data/styles", size=48, steps=6, log_every=2,
                 scales=(1.0,), device="cpu", layers=LAYERS, style_weight=30.0)
    members = tuple(Member(ROOT / "data/styles" / f, 0.5) for f in ("starry_night.jpg", "great_wave.jpg"))
    photo_path = ROOT / "data/content/chelsea.jpg"
    engine = engine_of(s)
    job = path_job(engine, photo_path, members[0].path, style="dusk", key="dusk-blend", members=members,
                   overrides=(("colors", "preserve"),))
    (made,) = engine.make([job])
    assert made.ok and made.final.total < made.start.total, made.error
    photo = to_tensor(decode.load_rgb(photo_path), 48)
    off = (_chroma(made.image) - _chroma(photo)).abs()
    assert off.mean() < 1e-3 and off.max() < 0.02
    assert (colors.luminance(made.image) - colors.luminance(photo)).abs().mean() > 0.01  # it was stylized
