"""docs/settings.md, rendered from the declarations in `settings`, so the page cannot say other than the code.

    python3 -m nst_batch.config.reference > docs/settings.md

A test compares the committed page with `render()`.
"""

from __future__ import annotations

from typing import Any

import yaml

from .settings import SETTINGS, Settings

HEADER = """# Manifest settings

Every key `pipeline.yaml` (or `--set KEY=VALUE`) may set. *Per style*: `per_style` may set it for some
styles only. *In recipe*: it changes an output's pixels, so changing it makes finished pairs again;
a key not in the recipe can change on a finished folder without redoing anything. The README explains
the keys at length.

<!-- Generated from nst_batch/config/settings.py: python3 -m nst_batch.config.reference > docs/settings.md -->
"""


def as_yaml(value: Any) -> str:
    """A value as a manifest writes it: `null`, `{}`, `'{style}/{content}'`, `0.02`."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("\n...").strip()


def default_text(key: str) -> str:
    """The key's default as docs and `--help` say it."""
    s = SETTINGS[key]
    return s.shown or as_yaml(Settings().to_dict()[key])


def _recipe_text(key: str) -> str:
    s = SETTINGS[key]
    if not s.in_recipe:
        return "no"
    return f"yes, {s.unless.says}" if s.unless else "yes"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    rows = ["| key | default | per style | in recipe | what it does |", "|---|---|---|---|---|"]
    for key, s in SETTINGS.items():
        does = s.help + (f" Option: `nst-batch run {s.cli}`." if s.cli else "")
        default = s.shown if s.shown else f"`{default_text(key)}`"
        rows.append(f"| `{key}` | {_cell(default)} | {'yes' if s.per_style else ''} | {_recipe_text(key)} "
                    f"| {_cell(does)} |")
    return HEADER + "\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
