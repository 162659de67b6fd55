"""Style controls: per-style settings, style blends, style size as a fraction of the output.

Plans are checked without a model; the engine on a short real VGG19 (relu1_1, relu2_1) at <= 48 px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from nst_batch.run import local
from nst_batch.core.engine import Engine
from nst_batch.files.stage import load_photo
from nst_batch.run.jobs import note_for
from nst_batch.errors import ConfigError
from nst_batch.batch.ledger import Ledger
from nst_batch.config.manifest import Settings
from nst_batch.config.manifest import Member
from nst_batch.batch.plan import make_plan, recipe_settings
from nst_batch.run.progress import Display

from conftest import engine_of as new_engine, make_image, path_job

LAYERS = {"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]}  # a short net: quick on a CPU


def _styles(tmp_path: Path) -> tuple[Path, Path]:
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "p.png", 40, 32, 1)
    make_image(styles / "a.png", 32, 32, 10)
    make_image(styles / "b.png", 40, 28, 11)
    make_image(styles / "oils" / "x.png", 32, 36, 12)
    make_image(styles / "oils" / "y.png", 36, 32, 13)
    return content, styles


def _plan(tmp_path, **kw):
    content, styles = _styles(tmp_path)
    return {p.style: p for p in make_plan(Settings(content=content, styles=styles, out=tmp_path / "o", **kw))}


# -- plans ------------------------------------------------------------------------------------------------

def test_per_style_first_match_wins_and_only_that_styles_recipe_moves(tmp_path):
    base = _plan(tmp_path)
    assert set(base) == {"a.png", "b.png", "oils"}
    s = _plan(tmp_path, per_style={"a.png": {"style_weight": 10.0}, "*": {"steps": 7}})
    assert s["a.png"].overrides == (("style_weight", 10.0),)  # the first pattern only: no steps from "*"
    assert s["b.png"].overrides == s["oils"].overrides == (("steps", 7),)
    assert all(s[k].recipe != base[k].recipe for k in base)
    # Changing one style's override redoes that style only.
    t = _plan(tmp_path, per_style={"a.png": {"style_weight": 11.0}, "*": {"steps": 7}})
    assert t["a.png"].recipe != s["a.png"].recipe and all(t[k].recipe == s[k].recipe for k in ("b.png", "oils"))
    make_image(tmp_path / "s" / "[1].png", 32, 32, 14)  # a name is its own pattern, glob characters or not
    assert _plan(tmp_path, per_style={"[1].png": {"steps": 5}})["[1].png"].overrides == (("steps", 5),)
    # Without per_style and blends, recipes are what they were before the keys existed.
    assert "per_style" not in recipe_settings(Settings()) and "blends" not in recipe_settings(Settings())
    # Workers sharing an OUT compare the run's whole recipe: per_style included.
    assert recipe_settings(Settings(per_style={"a.png": {"steps": 7}})) != recipe_settings(Settings())


@pytest.mark.parametrize("per_style, words", [
    ({"a.jpg": {"steps": 3}}, "per_style.a.jpg: matches no style; the styles are: a.png, b.png, oils"),
    ({"*.png": {"steps": 3}, "a.png": {"steps": 4}}, "per_style.a.png: matches only styles an earlier pattern"),
])
def test_a_per_style_pattern_that_sets_nothing_is_an_error(tmp_path, per_style, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("*", r"\*")):
        _plan(tmp_path, per_style=per_style)


def test_blends_from_the_manifest(tmp_path):
    plan = _plan(tmp_path, blends={"dusk": {"a.png": 3, "oils/x.png": 1}})
    dusk = plan["dusk"]
    assert dusk.output == "dusk/p.png" and dusk.style_path == dusk.members[0].path
    assert [(m.path.name, m.weight) for m in dusk.members] == [("a.png", 0.75), ("x.png", 0.25)]
    assert {"a.png", "b.png", "oils"} < set(plan)  # members still run as styles of their own
    # The recipe hashes every member's file and its normalised weight.
    same = _plan(tmp_path, blends={"dusk": {"a.png": 6, "oils/x.png": 2}})["dusk"]
    other = _plan(tmp_path, blends={"dusk": {"a.png": 1, "oils/x.png": 1}})["dusk"]
    assert same.recipe == dusk.recipe != other.recipe
    make_image(tmp_path / "s" / "a.png", 32, 32, 99)  # a member's file changed
    assert make_plan(Settings(content=tmp_path / "c", styles=tmp_path / "s", out=tmp_path / "o",
                              blends={"dusk": {"a.png": 3, "oils/x.png": 1}}))[-1].recipe != dusk.recipe
    with pytest.raises(ConfigError, match="blends.dusk: 'nope.png' is not a style image"):
        _plan(tmp_path, blends={"dusk": {"nope.png": 1}})
    with pytest.raises(ConfigError, match="blends.OILS: a style is already named"):
        _plan(tmp_path, blends={"OILS": {"a.png": 1}})


# -- the engine -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("styles")


@pytest.fixture(scope="module")
def engine_of():
    """Engines by settings, loaded once per module (VGG19 is the slow part)."""
    made: dict[Settings, Engine] = {}

    def get(s: Settings) -> Engine:
        if s not in made:
            made[s] = new_engine(s)
        return made[s]

    return get


def _settings(tmp_path: Path, **kw) -> Settings:
    content, styles = _styles(tmp_path)
    base = dict(content=content, styles=styles, out=tmp_path / "o", size=32, steps=3, log_every=3, scales=(1.0,),
                device="cpu", layers=LAYERS, stop_window=0, batch=2)
    return Settings(**{**base, **kw})


def test_blend_targets_are_the_weighted_gram_targets(folder, engine_of):
    s = _settings(folder)
    e = engine_of(s)
    e.style_pixels.add("A", s.styles / "a.png")
    e.style_pixels.add("B", s.styles / "b.png")
    only_a = e.styles.blend((("A", 1.0), ("B", 0.0)), "blend:1-0", 32)
    ta, tb = e.style_targets("A", 32), e.style_targets("B", 32)
    half = e.styles.blend((("A", 0.5), ("B", 0.5)), "blend:half", 32)
    for n in ta.tensors:
        torch.testing.assert_close(only_a.tensors[n], ta.tensors[n], rtol=0, atol=0)
        torch.testing.assert_close(only_a.norms[n], ta.norms[n])
        torch.testing.assert_close(half.tensors[n], (ta.tensors[n] + tb.tensors[n]) / 2)
        assert not torch.allclose(ta.tensors[n], tb.tensors[n])  # so the mean is not a trivial one


def test_style_size_as_a_fraction_of_the_output(folder, engine_of):
    """0.5 at size 32 is the style at 16 px: the same pixels as style_size 16, others than style_size null.
    (Set per style here, to load one model; the next test sets it for the whole run.)"""
    s = _settings(folder)
    e = engine_of(s)
    half, px16, full = e.make([path_job(e, s.content / "p.png", s.styles / "a.png", overrides=(("style_size", v),))
                               for v in (0.5, 16, None)])
    assert half.ok and px16.ok and full.ok, (half.error, px16.error, full.error)
    assert torch.equal(half.image, px16.image) and not torch.equal(half.image, full.image)


def test_each_job_is_made_with_its_own_styles_settings(folder, engine_of):
    """An engine with the run's settings makes a job with per_style overrides exactly as an engine whose
    own settings are those overrides; jobs of other settings are never batched together."""
    s = _settings(folder)
    e = engine_of(s)
    plain = path_job(e, s.content / "p.png", s.styles / "b.png")
    strong = path_job(e, s.content / "p.png", s.styles / "b.png",
                      overrides=(("style_weight", 30.0), ("style_size", 0.5), ("steps", 2)))
    m_plain, m_strong = e.make([plain, strong])
    assert m_plain.ok and m_strong.ok and m_plain.steps == 3 and m_strong.steps == 2
    other = engine_of(s.replace(style_weight=30.0, style_size=0.5, steps=2))
    alone = other.make([path_job(other, s.content / "p.png", s.styles / "b.png")])[0]
    assert torch.equal(m_strong.image, alone.image) and not torch.equal(m_strong.image, m_plain.image)
    assert m_strong.final.style != m_plain.final.style


def test_a_blend_members_unusable_profile_is_noted_on_the_pair(folder, engine_of):
    """As a style's own unusable ICC profile is: the member is used as sRGB, and the pair says so (the note
    is looked up by each member's key, not by the blend's, which keys no image). The driver joins it
    (run.jobs.note_for) from what decoding said; the engine never sees it."""
    s = _settings(folder)
    broken = folder / "broken.png"  # outside the styles folder: the other tests' plans stay as they are
    Image.fromarray(np.asarray(Image.open(s.styles / "a.png"))).save(broken, icc_profile=b"not a profile at all")
    members = (Member(s.styles / "b.png", 0.5), Member(broken, 0.5))
    e = engine_of(s)
    (m,) = e.make([path_job(e, s.content / "p.png", members[0].path, style="mix", key="blend:noted", members=members)])
    meta = load_photo(s.content / "p.png", s.size, s.max_megapixels)[1]
    m.note = note_for(m, meta, e.style_pixels)
    assert m.ok and m.note is not None and "style broken.png: its ICC profile is unreadable" in m.note, m.note


# -- end to end ----------------------------------------------------------------------------------------

def test_a_run_with_a_folder_blend_and_per_style_settings(tmp_path):
    s = _settings(tmp_path, steps=2, per_style={"oils": {"style_weight": 6.0}})
    quiet = Display(Console(quiet=True))
    assert local.run(s, quiet).made == 3
    assert sorted(p.name for p in s.out.iterdir() if p.is_dir() and p.name != "thumbs") == ["a", "b", "oils"]
    assert (s.out / "oils" / "p.png").is_file()
    # Another weight for the blend: only its pair is made again.
    again = local.run(s.replace(per_style={"oils": {"style_weight": 7.0}}), quiet)
    assert again.made == 1 and again.failed == 0
    with Ledger(s.out) as ledger:
        assert {r.style: r.state for r in ledger.rows()} == {"a.png": "done", "b.png": "done", "oils": "done"}
