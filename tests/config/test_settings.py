"""The declaration in config/settings.py is the one place a key's facts live: what is derived from it
agrees with it, and what people read (docs/settings.md, README tables, `--help`) cannot drift from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml

from nst_batch.batch.plan import NOT_IN_RECIPE, recipe_settings
from nst_batch.cli import app
from nst_batch.config import manifest
from nst_batch.config.reference import default_text, render
from nst_batch.config.settings import KEYS, PER_STYLE_KEYS, SETTINGS, Settings, check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("key", KEYS)
def test_each_default_passes_its_own_check(key):
    written = Settings().to_dict()[key]  # as a manifest (or the ledger) writes it
    assert check(key, written, "test") == getattr(Settings(), key)


@pytest.mark.parametrize("key", KEYS)
def test_each_help_is_one_line(key):
    h = SETTINGS[key].help
    assert h and "\n" not in h and h.endswith("."), h


def test_derived_tables():
    assert manifest.KEYS == KEYS and manifest.PER_STYLE_KEYS == PER_STYLE_KEYS
    assert PER_STYLE_KEYS == ("style_weight", "content_weight", "tv_weight", "style_size", "steps", "colors")
    assert NOT_IN_RECIPE == {"content", "styles", "out", "device", "log_every", "lease_s", "compile",
                             "max_megapixels", "name", "method", "network_steps", "refine_steps", "batch"}
    full = Settings(format="jpg", colors="match", per_style={"*": {"steps": 2}}, blends={"b": {"a.png": 1}}, bucket=32)
    assert set(recipe_settings(full)) == {k for k in KEYS if k not in NOT_IN_RECIPE} | {"engine"}


def test_run_and_retry_options_come_from_the_declaration():
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    run_opts = {p.name: p for p in commands["run"].params}
    declared = {k for k, s in SETTINGS.items() if s.cli}
    assert declared == set(run_opts) & set(KEYS), "a run option for a key, or a key's cli, without the other"
    for k in declared:
        assert run_opts[k].opts == [SETTINGS[k].cli] and run_opts[k].default is None
        assert run_opts[k].help.startswith(SETTINGS[k].help) and default_text(k) in run_opts[k].help
    for p in commands["retry"].params:
        if p.name in KEYS and p.param_type_name == "option":  # not OUT, the argument
            assert p.opts == [SETTINGS[p.name].cli] and p.help.startswith(SETTINGS[p.name].help)


def test_docs_settings_md_is_the_rendering():
    page = ROOT / "docs" / "settings.md"
    assert page.read_text(encoding="utf-8") == render(), \
        "docs/settings.md is stale: python3 -m nst_batch.config.reference > docs/settings.md"


# -- any table in the docs that gives a key's default --------------------------------------------------

def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def default_rows(text: str):
    """(key, default cell) of every markdown table row `| \\`key\\` | ... |` whose table has a `default`
    column; tables without one are skipped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[i + 1]) and "-" in lines[i + 1]):
            i += 1
            continue
        header = [h.lower() for h in _cells(lines[i])]
        col = header.index("default") if "default" in header else None
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            cells = _cells(lines[i])
            m = re.fullmatch(r"`(\w+)`", cells[0])
            if col is not None and m and m.group(1) in SETTINGS and col < len(cells):
                yield m.group(1), cells[col]
            i += 1


def states_default(key: str, cell: str) -> bool:
    """The cell says the key's default: as docs/settings.md says it, or a YAML value equal to it
    (`120` for 120.0, `"{style}/{content}"` quoted or not)."""
    code = re.fullmatch(r"`([^`]*)`", cell)
    text = code.group(1) if code else cell
    if text in (default_text(key), SETTINGS[key].shown):
        return True
    try:
        said = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    true = Settings().to_dict()[key]
    if isinstance(said, bool) or isinstance(true, bool):
        return said is true
    if isinstance(said, (int, float)) and isinstance(true, (int, float)):
        return float(said) == float(true)
    return said == true


def _docs() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_tables_in_the_docs_state_each_keys_true_default(doc):
    wrong = [f"{key}: {cell} (is {default_text(key)})" for key, cell in default_rows(doc.read_text(encoding="utf-8"))
             if not states_default(key, cell)]
    assert not wrong, f"{doc.name}: {wrong}"


def test_the_table_reader_finds_rows_and_skips_tables_without_a_default_column():
    text = ("| key | Default | meaning |\n|---|---|---|\n| `size` | `512` | x |\n| `lr` | 0.5 | y |\n"
            "| `nokey` | 1 | z |\n\n| key | meaning |\n|---|---|\n| `size` | 7 |\n")
    rows = list(default_rows(text))
    assert rows == [("size", "`512`"), ("lr", "0.5")]
    assert states_default(*rows[0]) and not states_default(*rows[1])
    assert states_default("lease_s", "`120`") and states_default("name", '`"{style}/{content}"`')
    assert states_default("style_weight", "preset's") and states_default("keep_gps", "`false`")
    assert not states_default("keep_gps", "`0`")
