"""pipeline.yaml -> `Settings`: every key checked, every error one line naming the key.

The manifest is the whole recipe of a run. CLI options and `--set KEY=VALUE` are
applied on top of it with the same checks, so a typo fails the same way wherever
it was typed. What each key may hold is declared once, in `settings`; this module reads files and
options and applies them with those checks.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from . import checks
from .checks import NAME_FIELDS, STYLE_FRACTION_MAX, fail  # noqa: F401 (re-exported)
from .settings import KEYS, PER_STYLE_KEYS, SETTINGS, WEIGHT_SOURCES, Settings, check  # noqa: F401 (re-exported)

Overrides = tuple[tuple[str, Any], ...]  # (key, value) of manifest.PER_STYLE_KEYS, from `per_style`


@dataclass(frozen=True)
class Member:
    """One image of a style: a style file is one member of weight 1; a blend has several."""
    path: Path
    weight: float  # normalised: a style's members' weights sum to 1
    hash: str | None = None  # the file's hash (None: the engine hashes it once)


_PATH_KEYS = tuple(k for k, s in SETTINGS.items() if s.check is checks.folder)  # relative to the manifest


def _unknown(key: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, KEYS, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def apply(settings: Settings, changes: dict[str, Any], source: str, base_dir: Path | None = None) -> Settings:
    """Return `settings` with `changes` checked and applied. Relative paths resolve against base_dir."""
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in KEYS:
            raise _unknown(str(key), source)
        v = check(key, value, source)
        if key in _PATH_KEYS and base_dir is not None and not v.is_absolute():
            v = base_dir / v
        if key == "weights" and v not in WEIGHT_SOURCES and base_dir is not None:
            p = Path(v).expanduser()  # a state-dict path: relative to the manifest, like the folders
            v = str(p if p.is_absolute() else base_dir / p)
        checked[key] = v
    result = settings.replace(**checked)
    if result.bit_depth == 16 and result.format != "png":  # what the two keys say together
        raise fail("bit_depth", f"16 needs format png (JPEG has 8 bits a channel), got format {result.format}", source)
    return result


def load(path: Path) -> Settings:
    """Read a manifest file. Paths inside it are relative to the file's folder."""
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not a UTF-8 text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value lines")
    return apply(Settings(), raw, str(path), base_dir=path.parent)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> dict; values are read as YAML so `--set scales=[0.5,1]` works."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
        if key.strip() == "name" and not isinstance(out["name"], str):
            out["name"] = value  # --set name={photo}: a template, which YAML would read as a mapping
    return out


def _folder_id(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def _is_or_inside(inner: Path, outer: Path) -> bool:
    """`inner` is the folder `outer` or lies inside it, compared by identity (device, inode): links,
    '..' and a differently cased name on a case-insensitive disk all count as the same folder."""
    if not outer.is_dir():
        return False
    target = _folder_id(outer)
    inner = inner.resolve()
    return any(_folder_id(p) == target for p in (inner, *inner.parents))


def check_folders(s: Settings) -> None:
    for key in ("content", "styles"):
        p: Path = getattr(s, key)
        if not p.is_dir():
            raise ConfigError(f"{key} folder not found: {p} (key '{key}')")
    if s.out.exists() and not s.out.is_dir():
        raise ConfigError(f"output path is a file, not a folder: {s.out} (key 'out')")
    # The output folder must not hold an input folder: outputs, thumbs/ and contact_sheet.jpg
    # would become inputs, and the collection would grow on every run. The other way round (out
    # inside content or styles, like ~/Pictures/holiday/styled) is a common layout and is safe:
    # the search never enters the output folder, nor any folder holding a run ledger (images.scan).
    for key in ("content", "styles"):
        p = getattr(s, key)
        if _is_or_inside(p, s.out):
            how = (f"is the {key} folder" if _folder_id(p) == _folder_id(s.out)
                   else f"contains the {key} folder {p}")
            raise ConfigError(f"output folder {s.out} {how}: its images would be read back as inputs; "
                              f"choose an output folder outside it (key 'out')")
