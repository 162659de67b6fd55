"""Manifest and option checking: every error is one line naming the key or path, exit code 2, no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import cli, make_image
from nst_batch.config import manifest
from nst_batch.cli import _settings
from nst_batch.errors import EXIT_USAGE, ConfigError
from nst_batch.config.manifest import Settings


def write_manifest(folder: Path, text: str, name: str = "pipeline.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def usage_error(*args: str, cwd: Path | None = None) -> str:
    """Run the CLI, expect exit 2 and a one-line, traceback-free error; return stderr."""
    r = cli(*args, cwd=cwd, timeout=120)
    assert r.returncode == EXIT_USAGE, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.stderr.startswith("error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, whatever the terminal width
    return r.stderr


# -- one test per error kind, through the CLI -----------------------------------------------------------


def test_unknown_key_suggests_the_near_one(tmp_path):
    m = write_manifest(tmp_path, "stpes: 10\n")
    err = usage_error("run", str(m))
    assert str(m) in err
    assert "unknown key 'stpes'" in err
    assert "did you mean 'steps'" in err


def test_unknown_key_without_near_match_has_no_suggestion():
    with pytest.raises(ConfigError, match="unknown key 'zzzzqqq'") as e:
        manifest.apply(Settings(), {"zzzzqqq": 1}, "test")
    assert "did you mean" not in str(e.value)


def test_wrong_type(tmp_path):
    m = write_manifest(tmp_path, "steps: ten\n")
    err = usage_error("run", str(m))
    assert "key 'steps'" in err and "integer" in err and "'ten'" in err


@pytest.mark.parametrize("text, key, words", [
    ("size: 5\n", "size", "between 16 and 16384, got 5"),
    ("optimizer: sgd\n", "optimizer", "lbfgs, adam, got 'sgd'"),
    ("scales: [0.5, 0.8]\n", "scales", "rise to 1.0"),
    ("layers: {content: [relu4_2], style: [relu1_1, relu9_1]}\n", "layers.style", "relu9_1"),
])
def test_bad_value(tmp_path, text, key, words):
    m = write_manifest(tmp_path, text)
    err = usage_error("run", str(m))
    assert f"key '{key}'" in err and words in err and str(m) in err


@pytest.mark.parametrize("changes, key", [
    ({"scales": [1.0, 0.5]}, "scales"),  # must rise
    ({"scales": [0.5, 1.5]}, "scales"),
    ({"scales": []}, "scales"),
    ({"layers": "picasso"}, "layers"),
    ({"layers": {"content": ["relu4_2"]}}, "layers"),  # style list missing
    ({"layers": {"content": ["conv_99"], "style": ["relu1_1"]}}, "layers.content"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),  # a YAML boolean is not an integer
    ({"lr": 0}, "lr"),
    ({"quality": 101}, "quality"),
    ({"format": "gif"}, "format"),
    ({"device": "gpu"}, "device"),
    ({"compile": "yes"}, "compile"),
    ({"content": None}, "content"),
    ({"style_weight": -1}, "style_weight"),
    ({"max_megapixels": 0}, "max_megapixels"),
    ({"style_size": 256.0}, "style_size"),  # a float is a fraction of size: (0, 4]
    ({"style_size": 0.0}, "style_size"),
    ({"style_size": 2}, "style_size"),  # an int is pixels, >= MIN_SIDE
    ({"per_style": ["a.jpg"]}, "per_style"),
    ({"per_style": {"a*.jpg": {"style_weight": -1}}}, "per_style.a*.jpg.style_weight"),  # checked as top-level
    ({"per_style": {"a.jpg": {"style_size": 9.0}}}, "per_style.a.jpg.style_size"),
    ({"per_style": {"a.jpg": {"size": 64}}}, "per_style.a.jpg.size"),  # not a per-style key
    ({"per_style": {"a.jpg": {}}}, "per_style.a.jpg"),
    ({"blends": {"dusk": {"a.jpg": 0}}}, "blends.dusk.a.jpg"),  # weights > 0
    ({"blends": {"dusk": {"/abs/a.jpg": 1}}}, "blends.dusk./abs/a.jpg"),
    ({"blends": {"x/y": {"a.jpg": 1}}}, "blends.x/y"),  # it names a folder
    ({"blends": {"dusk": {}}}, "blends.dusk"),
    ({"colors": "original"}, "colors"),
])
def test_bad_values_name_their_key(changes, key):
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}'")):
        manifest.apply(Settings(), changes, "src")


@pytest.mark.parametrize("key", ["lr", "content_weight", "stop_tolerance", "max_megapixels"])
def test_nan_is_not_a_valid_number(key):
    # `.nan` is a YAML float; it passed every `< lo` check and made every pair fail later as 'nonfinite'.
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        manifest.apply(Settings(), {key: float("nan")}, "src")


def test_invalid_yaml_names_file_and_line(tmp_path):
    m = write_manifest(tmp_path, "steps: 3\nsize: [1, 2\nseed: 1\n")
    err = usage_error("run", str(m))
    assert str(m) in err and "not valid YAML" in err and "line " in err


def test_manifest_that_is_not_a_mapping(tmp_path):
    m = write_manifest(tmp_path, "- a\n- b\n")
    err = usage_error("run", str(m))
    assert str(m) in err and "mapping" in err


def test_manifest_not_found(tmp_path):
    err = usage_error("run", str(tmp_path / "nope.yaml"))
    assert "manifest not found" in err and str(tmp_path / "nope.yaml") in err


def test_missing_content_folder(folders):
    content, styles, out = folders
    missing = content.parent / "no-such-folder"
    err = usage_error("run", "--content", str(missing), "--styles", str(styles), "--out", str(out))
    assert str(missing) in err and "key 'content'" in err
    assert not out.exists()  # nothing was started


def test_empty_style_folder(folders):
    content, _, out = folders
    empty = content.parent / "empty-styles"
    empty.mkdir()
    (empty / "readme.txt").write_text("not an image")  # a non-image file does not count
    (empty / ".hidden.png").write_bytes(b"")
    err = usage_error("run", "--content", str(content), "--styles", str(empty), "--out", str(out))
    assert "no images" in err and str(empty) in err and "key 'styles'" in err


# The output folder holding an input folder: its outputs, thumbs/ and contact_sheet.jpg would become
# inputs, and the collection would grow on every run. Each layout through the CLI, as typed.
@pytest.mark.parametrize("content_rel, styles_rel, out_rel, words", [
    ("photos", "art", "photos", "is the content folder"),
    ("photos", "art", "art", "is the styles folder"),
    ("photos", "art", "art/../photos/.", "is the content folder"),  # the same folder, spelled otherwise
    ("photos", "art", ".", "contains the content folder"),  # content (and styles) inside out
    ("res/photos", "art", "res", "contains the content folder"),
    ("photos", "res/deep/art", "res", "contains the styles folder"),
])
def test_output_folder_holding_an_input_folder_is_refused(tmp_path, content_rel, styles_rel, out_rel, words):
    make_image(tmp_path / content_rel / "a.png", 32, 32, 1)
    make_image(tmp_path / styles_rel / "s.png", 32, 32, 2)
    before = sorted(tmp_path.rglob("*"))
    err = usage_error("run", "--content", content_rel, "--styles", styles_rel, "--out", out_rel, "--device", "cpu",
                      "--size", "32", "--steps", "1", "--set", "scales=[1.0]", cwd=tmp_path)
    assert "key 'out'" in err and words in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no ledger, no image


def test_output_folder_linked_to_the_content_folder_is_refused(folders):
    content, styles, _ = folders
    link = content.parent / "results"
    link.symlink_to(content, target_is_directory=True)
    err = usage_error("run", "--content", str(content), "--styles", str(styles), "--out", str(link),
                      "--device", "cpu", "--size", "32", "--steps", "1", "--set", "scales=[1.0]")
    assert "key 'out'" in err and "is the content folder" in err


def test_output_folder_inside_an_input_folder_is_allowed(folders):
    # ~/Pictures/holiday/styled: a common layout; the search never enters the output folder.
    content, styles, _ = folders
    for out in (content / "styled", styles / "results" / "run1"):
        s = Settings(content=content, styles=styles, out=out)
        manifest.check_folders(s)
        out.mkdir(parents=True)
        manifest.check_folders(s)


@pytest.mark.parametrize("item", ["steps", "=3", " =3"])
def test_set_syntax_error(item):
    err = usage_error("run", "--set", item)
    assert "--set" in err and "KEY=VALUE" in err and repr(item) in err


def test_set_value_is_checked_like_the_manifest():
    err = usage_error("run", "--set", "size=5")
    assert "--set: key 'size'" in err


def test_error_with_brackets_is_printed_verbatim(tmp_path):
    # Paths are user data: a folder called "a[/b]" must not be read as rich markup (MarkupError traceback).
    missing = tmp_path / "runs[/old]" / "pipeline.yaml"
    err = usage_error("run", str(missing))
    assert str(missing) in err


# -- parsing, paths and precedence ----------------------------------------------------------------------


def test_paths_resolve_relative_to_the_manifest_folder(tmp_path):
    m = write_manifest(tmp_path / "project" / "conf", "content: ../photos\nstyles: /abs/styles\nout: res\n")
    s = manifest.load(m)
    assert s.content.resolve() == (tmp_path / "project" / "photos").resolve()
    assert s.styles == Path("/abs/styles")
    assert s.out.resolve() == (tmp_path / "project" / "conf" / "res").resolve()


def test_home_folder_in_a_manifest_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = manifest.load(write_manifest(tmp_path / "conf", "content: ~/Pictures\nout: ~/styled\n"))
    assert s.content == tmp_path / "home" / "Pictures"  # not conf/~/Pictures
    assert s.out == tmp_path / "home" / "styled"
    assert manifest.apply(Settings(), manifest.parse_set(["styles=~/art"]), "--set").styles == tmp_path / "home" / "art"


def test_empty_manifest_is_the_defaults(tmp_path):
    assert manifest.load(write_manifest(tmp_path, "# nothing\n")) == Settings()


def test_set_parses_yaml_values():
    changes = manifest.parse_set(["layers=tutorial", "scales=[0.5,1]", "style_weight=1e4", "format=jpeg",
                                  "content_weight=", "init = noise"])
    s = manifest.apply(Settings(), changes, "--set")
    assert s.layers.to_manifest() == "tutorial"
    assert s.scales == (0.5, 1.0)
    assert s.style_weight == 1e4
    assert s.format == "jpg"
    assert s.content_weight is None
    assert s.init == "noise"


def test_set_layers_mapping_uses_canonical_names():
    s = manifest.apply(Settings(), manifest.parse_set(["layers={content: [conv_4], style: [relu_1, relu3_1]}"]),
                       "--set")
    assert s.layers.to_manifest() == {"content": ["conv2_2"], "style": ["relu1_1", "relu3_1"]}


def test_precedence_manifest_then_set_then_options(tmp_path):
    m = write_manifest(tmp_path, "steps: 10\nsize: 100\nseed: 7\nlr: 0.5\ncontent: c1\n")
    s = _settings(m, {"steps": 30, "size": None, "content": tmp_path / "c3"}, ["steps=20", "size=200", "lr=0.1"])
    assert s.steps == 30  # explicit option beats --set beats manifest
    assert s.size == 200  # --set beats manifest; an option left unset (None) does not count
    assert s.lr == 0.1
    assert s.seed == 7  # manifest beats defaults
    assert s.content == tmp_path / "c3"
    assert s.steps != Settings().steps


def test_options_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="option: key 'size'"):
        _settings(write_manifest(tmp_path, ""), {"size": 3}, [])


def test_settings_round_trip_through_to_dict():
    s = manifest.apply(Settings(), {"scales": [0.5, 1.0], "layers": {"content": ["relu4_2"], "style": ["relu1_1"]},
                                    "content": "/x/c", "style_size": 0.5,
                                    "per_style": {"b*": {"steps": 9, "style_size": 64}, "*": {"style_weight": "1e2"}},
                                    "blends": {"dusk": {"a.jpg": 2, "sub/b.jpg": 1}}}, "t")
    assert s.style_size == 0.5 and s.per_style == (("b*", (("steps", 9), ("style_size", 64))),
                                                   ("*", (("style_weight", 100.0),)))
    # `retry` rebuilds the settings from the ledger's JSON: the same, the per_style order included.
    assert manifest.apply(Settings(), json.loads(json.dumps(s.to_dict())), "ledger") == s
    assert manifest.apply(Settings(), {"style_size": 256}, "t").style_px(512) == 256
    assert s.style_px(512) == 256 and s.style_px(100) == 50
