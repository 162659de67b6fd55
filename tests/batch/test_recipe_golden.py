"""Recipe hashes pinned to hex values computed once: a refactor of how settings are declared, checked or
encoded must not change a single recipe, or every finished pair of every output folder would be made again.

If a change is MEANT to alter pixels, bump plan.ENGINE_VERSION and recompute these values; never edit
them to make a refactor pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataclasses import replace

from nst_batch.batch.plan import Pair, blend_hash, recipe_hash, recipe_settings, style_settings
from nst_batch.config.manifest import Member, Settings
from nst_batch.batch.methods import model_recipe, network_recipe

C, S = "c" * 64, "s" * 64  # a photo's and a style's file hashes


def plain() -> Settings:
    # Bookkeeping keys set to non-defaults too: they must stay out of the recipe.
    return Settings(content=Path("/in"), styles=Path("/st"), out=Path("/out"), size=256, steps=40,
                    scales=(0.5, 1.0), device="cpu", lease_s=30.0, log_every=5, name="{content}/{style}")


CASES = {
    "defaults": (Settings(), "67f39f9cfaf6ea3b"),
    "plain": (plain(), "b1d87c24c8a6bb60"),
    "jpg, colors, layers mapping, weights": (
        plain().replace(format="jpg", quality=80, colors="preserve", style_weight=1e5, tv_weight=0.0,
                        layers={"content": ["relu4_2"], "style": ["relu1_1", "conv_4"]}, style_size=0.5),
        "25d10db7e2c01c9f"),
    "run with per_style and blends (the run's whole recipe)": (
        plain().replace(per_style={"starry*": {"style_weight": 10.0, "steps": 80}},
                        blends={"dusk": {"a.png": 2.0, "b.png": 1.0}}),
        "3a5f84ff24aa8f54"),
    "one style's per_style override": (
        style_settings(plain().replace(per_style={"starry*": {"style_weight": 10.0, "steps": 80}}),
                       (("style_weight", 10.0), ("steps", 80))),
        "3d59441228826b34"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_hash_is_pinned(case):
    settings, expected = CASES[case]
    assert recipe_hash(settings, C, S) == expected


def test_an_override_is_the_same_recipe_as_those_values_set_for_the_run():
    assert recipe_hash(plain().replace(style_weight=10.0, steps=80), C, S) == CASES["one style's per_style override"][1]


def test_a_blend_recipe_is_pinned():
    members = (Member(Path("/st/a.png"), 2 / 3, "a" * 64), Member(Path("/st/b.png"), 1 / 3, "b" * 64))
    style = blend_hash(members)
    assert style == "blend:746c58fd4dccb4043348137fa5a61eca13c823d819a326f3324f95e826fe8d4d"
    s = plain().replace(blends={"dusk": {"a.png": 2.0, "b.png": 1.0}})
    assert recipe_hash(style_settings(s, ()), C, style) == "cc2c2ef55094063f"


def test_network_recipes_are_pinned():
    s = plain().replace(method="network", network_steps=300, refine_steps=20)
    pairs = [recipe_hash(s, c * 64, S) for c in "123"]
    assert pairs == ["87d2a2882cdb364e", "adf4720286f0d432", "413604c2d3f92139"]
    # A model's recipe covers the style and the settings a network learns from, not the photos (it was
    # "39ad58e3fc049bb4" over these three pairs' recipes: changing that made network pairs again once).
    style = Pair("1.png", "s.png", Path("/in/1.png"), Path("/st/s.png"), "s/1.png", pairs[0], S)
    model = model_recipe(s, style)
    assert model == MODEL
    assert network_recipe(pairs[0], model, s.refine_steps) == NETWORK_PAIR
    # Another photo of the style, or the refinement's settings: the same model.
    assert model_recipe(s.replace(steps=9, format="jpg"), replace(style, content="2.png", recipe=pairs[1])) == model


def test_recipe_keys_are_pinned():
    """What a plain recipe holds, by name: a key joining or leaving it changes every recipe."""
    assert sorted(recipe_settings(plain())) == RECIPE_KEYS


RECIPE_KEYS = ["bit_depth", "content_weight", "engine", "format", "init", "keep_gps", "layers", "lr",
               "optimizer", "pooling", "precision", "scales", "seed", "size", "steps", "stop_tolerance",
               "stop_window", "style_size", "style_weight", "tv_weight", "weights"]

MODEL, NETWORK_PAIR = "95b5e06cc380f27a", "02905a2290b3da50"  # ENGINE_VERSION 4 (the batched L-BFGS)
