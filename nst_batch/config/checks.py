"""The checks a manifest value goes through: a few reusable kinds (integer, number, choice, ...) and the
keys whose values have a shape of their own (name templates, scales, layers, style_size, blends).

A checker is `(name, value, source) -> value`: it returns the value as `Settings` holds it, or raises
ConfigError with one line naming `name` (the key, or `per_style.<pattern>.<key>` for an override).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .objective import MIN_SIDE, Layers, LayersError

Checker = Callable[[str, Any, str], Any]

MAX_SIDE = 16384
STYLE_FRACTION_MAX = 4.0  # style_size as a fraction of size: (0, 4]
NAME_FIELDS = ("style", "content", "photo", "folder")


def fail(key: str, msg: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: key '{key}' {msg}")


# -- reusable kinds --------------------------------------------------------------------------------

def _int(key, v, source, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(key, f"must be an integer, got {v!r}", source)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise fail(key, f"must be {rng}, got {v}", source)
    return v


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _float(key, v, source, lo=None, allow_none=False, strict=False):
    if v is None and allow_none:
        return None
    if isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()):
        v = float(v)  # YAML 1.1 reads 1e6 (no dot) as a string; people write weights that way
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise fail(key, f"must be a number, got {v!r}", source)
    v = float(v)
    if lo is not None and (v <= lo if strict else v < lo):
        raise fail(key, f"must be {'>' if strict else '>='} {lo}, got {v:g}", source)
    return v


def integer(lo: int | None = None, hi: int | None = None) -> Checker:
    """An int (not a bool) in [lo, hi]."""
    return lambda n, v, source: _int(n, v, source, lo, hi)


def batch(n: str, v: Any, source: str) -> int | str:
    """auto, or an int in [1, 256]."""
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(n, f"must be auto or an integer between 1 and 256, got {v!r}", source)
    return _int(n, v, source, 1, 256)


def number(lo: float | None = None, strict: bool = False, optional: bool = False) -> Checker:
    """A float >= lo (> lo when strict); None too when optional; '1e6' as YAML 1.1 leaves it is a number."""
    return lambda n, v, source: _float(n, v, source, lo, allow_none=optional, strict=strict)


def choice(*choices: str, aliases: dict[str, str] | None = None) -> Checker:
    """One of `choices`; an alias is taken as the choice it names (jpeg: jpg)."""
    def check(n, v, source):
        v = (aliases or {}).get(v, v)
        if v not in choices:
            raise fail(n, f"must be one of {', '.join(choices)}, got {v!r}", source)
        return v
    return check


def boolean(n: str, v: Any, source: str) -> bool:
    if not isinstance(v, bool):
        raise fail(n, f"must be true or false, got {v!r}", source)
    return v


def folder(n: str, v: Any, source: str) -> Path:
    if not isinstance(v, (str, Path)) or not str(v):
        raise fail(n, f"must be a folder path, got {v!r}", source)
    return Path(v).expanduser()  # 'content: ~/Pictures' in a manifest: no shell expands it there


# -- keys with a shape of their own ----------------------------------------------------------------

def bit_depth(n: str, v: Any, source: str) -> int:
    if v not in (8, 16) or isinstance(v, bool):
        raise fail(n, f"must be 8 or 16, got {v!r}", source)
    return v


def weights(n: str, v: Any, source: str) -> str:
    if not isinstance(v, str) or not v:
        raise fail(n, f"must be vgg19-caffe, torchvision or a path to a state dict, got {v!r}", source)
    return v


def device(n: str, v: Any, source: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        raise fail("device", f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}", source)
    return v


def layers(n: str, v: Any, source: str) -> Layers:
    try:
        return Layers.parse(v)
    except LayersError as e:
        raise fail(f"layers.{e.part}" if e.part else "layers", str(e), source) from None


def scales(n: str, v: Any, source: str) -> tuple[float, ...] | str:
    if v == "auto":
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise fail(n, f"must be auto or a list of fractions of size ending with 1.0, e.g. [0.5, 1.0], got {v!r}", source)
    vals = tuple(_float(n, x, source, lo=0, strict=True) for x in v)
    if vals[-1] != 1.0 or any(x > 1.0 for x in vals) or list(vals) != sorted(vals):
        raise fail(n, f"must rise to 1.0, e.g. [0.5, 1.0], got {list(vals)}", source)
    return vals


def style_size(n: str, v: Any, source: str) -> int | float | None:
    """An int is pixels (>= MIN_SIDE), a float a fraction of `size` in (0, 4]: the YAML type decides, so
    `0.5` and `256` cannot be confused; `256.0` is refused rather than guessed."""
    if v is None:
        return None
    if isinstance(v, float):
        if not 0 < v <= STYLE_FRACTION_MAX:
            hint = f"; for pixels write an integer ({int(v)})" if v.is_integer() and v >= MIN_SIDE else ""
            raise fail(n, f"as a fraction of size must be in (0, {STYLE_FRACTION_MAX:g}], got {v:g}{hint}", source)
        return v
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < MIN_SIDE:
        raise fail(n, f"is pixels when an integer (>= {MIN_SIDE}), got {v}; for a fraction of size write "
                      f"{float(v)}", source)
    return _int(n, v, source, lo=MIN_SIDE, hi=MAX_SIDE)


def name_template(n: str, v: Any, source: str) -> str:
    """An output name template: literal text and {style} {content} {photo} {folder}, '/' between folders.
    Refused: anything that could lead out of the output folder (an absolute path, a '..' part) or hide
    an output (a part starting with '.'), '\\' (a folder on one system, a name on another), and what
    str.format would do more with (conversions, format specs, other fields). Collisions between pairs
    are found by the plan, which knows the names."""
    if isinstance(v, dict):  # name: {style}/x unquoted is a YAML mapping
        raise fail("name", 'must be a quoted text such as "{style}/{content}" (unquoted, YAML reads {...} '
                   "as a mapping)", source)
    if not isinstance(v, str) or not v.strip():
        raise fail("name", f'must be a text such as "{{style}}/{{content}}", got {v!r}', source)
    try:
        parts = list(string.Formatter().parse(v))
    except ValueError as e:
        raise fail("name", f"is not a valid template ({e}; a literal brace is written {{{{ or }}}}): {v!r}",
                   source) from None
    for _, field, spec, conv in parts:
        if field is not None and (field not in NAME_FIELDS or spec or conv):
            raise fail("name", f"may use {', '.join('{' + f + '}' for f in NAME_FIELDS)} only, got "
                       f"{{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} in {v!r}", source)
    if v.startswith(("/", "~")) or "\\" in v or "\x00" in v or re.match(r"[A-Za-z]:", v):
        raise fail("name", f"must be a path relative to the output folder, with '/' between folders, got {v!r}",
                   source)
    if any(seg.startswith(".") for seg in v.split("/")):  # '..' would leave the folder; '.x' hides the output
        raise fail("name", f"must stay inside the output folder: no part may start with '.', got {v!r}", source)
    return v


def mapping(n: str, v: Any, source: str, example: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise fail(n, f"must be a mapping, e.g. {example}, got {v!r}", source)
    for k in v:
        if not isinstance(k, str) or not k:
            raise fail(n, f"keys must be non-empty text, got {k!r}", source)
    return v


_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def blends(n: str, v: Any, source: str) -> tuple:
    """{name: {style file: weight}} -> ((name, ((file, weight), ...)), ...); weights > 0, files relative
    to the styles folder (that they exist is the plan's check)."""
    out = []
    for name, members in mapping("blends", v, source, "{dusk: {starry_night.jpg: 2, the_great_wave.jpg: 1}}").items():
        where = f"blends.{name}"
        if _BAD_NAME.search(name) or name in (".", "..") or name.startswith("."):
            raise fail(where, "must be a plain folder name (no '/', no leading '.'): it names the output folder",
                       source)
        members = mapping(where, members, source, "{starry_night.jpg: 2, the_great_wave.jpg: 1}")
        if not members:
            raise fail(where, "has no members; list style files with weights, e.g. {a.jpg: 1, b.jpg: 1}", source)
        checked = []
        for file, weight in members.items():
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise fail(f"{where}.{file}", "must be a path relative to the styles folder", source)
            checked.append((file, _float(f"{where}.{file}", weight, source, lo=0, strict=True)))
        out.append((name, tuple(checked)))
    return tuple(out)
