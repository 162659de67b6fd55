"""pipeline.yaml -> `Settings`: every key checked, every error one line naming the key.

The manifest is the whole recipe of a run. CLI options and `--set KEY=VALUE` are
applied on top of it with the same checks, so a typo fails the same way wherever
it was typed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .objective import GATYS, MIN_SIDE, Layers, LayersError

Overrides = tuple[tuple[str, Any], ...]  # (key, value) of manifest.PER_STYLE_KEYS, from `per_style`


@dataclass(frozen=True)
class Member:
    """One image of a style: a style file is one member of weight 1; a blend has several."""
    path: Path
    weight: float  # normalised: a style's members' weights sum to 1
    hash: str | None = None  # the file's hash (None: the engine hashes it once)


WEIGHT_SOURCES = ("vgg19-caffe", "torchvision")


@dataclass(frozen=True)
class Settings:
    content: Path = Path("data/content")
    styles: Path = Path("data/styles")
    out: Path = Path("results")
    size: int = 512
    style_size: int | float | None = None  # int: pixels; float: a fraction of `size` (style_px)
    colors: str = "style"  # style | preserve | match: what the output's colours come from (colors.py)
    steps: int = 300
    optimizer: str = "lbfgs"
    lr: float = 0.02
    layers: Layers = GATYS
    content_weight: float | None = None
    style_weight: float | None = None
    tv_weight: float | None = None
    pooling: str = "max"
    init: str = "content"
    weights: str = "vgg19-caffe"
    device: str = "auto"
    seed: int = 0
    format: str = "png"
    quality: int = 95
    bit_depth: int = 8
    keep_gps: bool = False
    name: str = "{style}/{content}"
    log_every: int = 10
    scales: tuple[float, ...] | str = "auto"  # "auto": from `size` (pyramid.auto_scales), resolved by engine.resolve
    stop_window: int = 20
    stop_tolerance: float = 0.01
    precision: str = "auto"
    compile: bool = False
    batch: int = 1
    lease_s: float = 120.0
    max_megapixels: float = 100.0
    # (pattern, ((key, value), ...)) in manifest order: the first pattern matching a style's name sets
    # its overrides (plan.style_settings). Tuples, not dicts: Settings stays hashable.
    per_style: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # (name, ((member file relative to `styles`, weight), ...)): weights as written; the plan normalises.
    blends: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    method: str = "auto"  # optimize | network | auto (issue 13: a learned per-style network)
    network_steps: int = 600  # training steps of a style's network
    refine_steps: int = 50  # L-BFGS steps at full size from the network's output

    def __post_init__(self) -> None:
        # Code may hand `layers` over as the manifest writes it (a preset name or a mapping): one type here.
        object.__setattr__(self, "layers", Layers.parse(self.layers))
        # Likewise per_style and blends as mappings (a test, a stored settings dict): nested tuples here.
        for key in ("per_style", "blends"):
            v = getattr(self, key)
            if isinstance(v, dict):
                object.__setattr__(self, key, tuple((k, tuple(dict(inner).items())) for k, inner in v.items()))

    def style_px(self, size: int) -> int:
        """The style's long side for an output whose long side is `size`: `style_size` pixels (an int),
        that fraction of `size` (a float), or `size` itself (None)."""
        if self.style_size is None:
            return size
        if isinstance(self.style_size, float):
            return max(MIN_SIDE, round(self.style_size * size))
        return self.style_size

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """As a manifest writes it (the ledger stores this, and recipes hash it)."""
        d = dataclasses.asdict(self)
        for k in ("content", "styles", "out"):
            d[k] = str(d[k])
        d["scales"] = self.scales if isinstance(self.scales, str) else list(self.scales)
        d["layers"] = self.layers.to_manifest()
        d["per_style"] = {pattern: dict(changes) for pattern, changes in self.per_style}
        d["blends"] = {name: dict(members) for name, members in self.blends}
        return d


KEYS = tuple(f.name for f in dataclasses.fields(Settings))
_PATH_KEYS = ("content", "styles", "out")
# What `per_style` may set: what changes a style's objective, targets or effort, and nothing the model
# (layers, pooling, weights) or a batch's shape (size) depends on, which one engine shares by all styles.
# `colors` joins the list as soon as Settings has it.
PER_STYLE_KEYS = tuple(k for k in ("style_weight", "content_weight", "tv_weight", "style_size", "steps", "colors")
                       if k in KEYS)
STYLE_FRACTION_MAX = 4.0  # style_size as a fraction of size: (0, 4]


def _fail(key: str, msg: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: key '{key}' {msg}")


def _int(key, v, source, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(key, f"must be an integer, got {v!r}", source)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _fail(key, f"must be {rng}, got {v}", source)
    return v


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _float(key, v, source, lo=None, allow_none=False, strict=False):
    if v is None and allow_none:
        return None
    if isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()):
        v = float(v)  # YAML 1.1 reads 1e6 (no dot) as a string; people write weights that way
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise _fail(key, f"must be a number, got {v!r}", source)
    v = float(v)
    if lo is not None and (v <= lo if strict else v < lo):
        raise _fail(key, f"must be {'>' if strict else '>='} {lo}, got {v:g}", source)
    return v


def _choice(key, v, source, choices):
    if v not in choices:
        raise _fail(key, f"must be one of {', '.join(choices)}, got {v!r}", source)
    return v


def _check_layers(v, source) -> Layers:
    try:
        return Layers.parse(v)
    except LayersError as e:
        raise _fail(f"layers.{e.part}" if e.part else "layers", str(e), source) from None


def _check_device(v, source):
    import re

    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        raise _fail("device", f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}", source)
    return v


def _check(key: str, v: Any, source: str, name: str | None = None) -> Any:
    """Return the value of `key` converted to its Settings type, or raise ConfigError naming `name`
    (default: the key; `per_style.<pattern>.<key>` for an override)."""
    n = name or key
    if key in _PATH_KEYS:
        if not isinstance(v, (str, Path)) or not str(v):
            raise _fail(n, f"must be a folder path, got {v!r}", source)
        return Path(v).expanduser()  # 'content: ~/Pictures' in a manifest: no shell expands it there
    if key == "size":
        return _int(n, v, source, lo=MIN_SIDE, hi=16384)
    if key == "style_size":
        return _style_size(n, v, source)
    if key == "colors":
        return _choice(n, v, source, ("style", "preserve", "match"))  # colors.COLORS; that module is torch
    if key in ("steps",):
        return _int(n, v, source, lo=1)
    if key == "optimizer":
        return _choice(n, v, source, ("lbfgs", "adam"))
    if key == "lr":
        return _float(n, v, source, lo=0, strict=True)
    if key == "layers":
        return _check_layers(v, source)
    if key in ("content_weight", "style_weight", "tv_weight"):
        return _float(n, v, source, lo=0, allow_none=True)
    if key == "pooling":
        return _choice(n, v, source, ("max", "avg"))
    if key == "init":
        return _choice(n, v, source, ("content", "noise"))
    if key == "weights":
        if not isinstance(v, str) or not v:
            raise _fail(n, f"must be vgg19-caffe, torchvision or a path to a state dict, got {v!r}", source)
        return v
    if key == "device":
        return _check_device(v, source)
    if key == "seed":
        return _int(n, v, source, lo=0)
    if key == "format":
        v = {"jpeg": "jpg"}.get(v, v)
        return _choice(n, v, source, ("png", "jpg"))
    if key == "quality":
        return _int(n, v, source, lo=1, hi=100)
    if key == "bit_depth":
        if v not in (8, 16) or isinstance(v, bool):
            raise _fail(n, f"must be 8 or 16, got {v!r}", source)
        return v
    if key in ("keep_gps", "compile"):
        if not isinstance(v, bool):
            raise _fail(n, f"must be true or false, got {v!r}", source)
        return v
    if key == "name":
        return _check_name(v, source)
    if key == "log_every":
        return _int(n, v, source, lo=1)
    if key == "scales":
        if v == "auto":
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v:
            raise _fail(n, f"must be auto or a list of fractions of size ending with 1.0, e.g. [0.5, 1.0], got {v!r}", source)
        vals = tuple(_float(n, x, source, lo=0, strict=True) for x in v)
        if vals[-1] != 1.0 or any(x > 1.0 for x in vals) or list(vals) != sorted(vals):
            raise _fail(n, f"must rise to 1.0, e.g. [0.5, 1.0], got {list(vals)}", source)
        return vals
    if key == "batch":
        return _int(n, v, source, lo=1, hi=256)
    if key == "stop_window":
        return _int(n, v, source, lo=0)
    if key == "stop_tolerance":
        return _float(n, v, source, lo=0)
    if key == "precision":
        return _choice(n, v, source, ("auto", "fp32", "bf16"))
    if key == "lease_s":
        return _float(n, v, source, lo=1)
    if key == "max_megapixels":
        return _float(n, v, source, lo=0, strict=True)
    if key == "per_style":
        return _per_style(v, source)
    if key == "blends":
        return _blends(v, source)
    if key == "method":
        return _choice(n, v, source, ("optimize", "network", "auto"))
    if key == "network_steps":
        return _int(n, v, source, lo=1)
    if key == "refine_steps":
        return _int(n, v, source, lo=0)
    raise AssertionError(key)  # every Settings field is handled above


NAME_FIELDS = ("style", "content", "photo", "folder")


def _check_name(v: Any, source: str) -> str:
    """An output name template: literal text and {style} {content} {photo} {folder}, '/' between folders.
    Refused: anything that could lead out of the output folder (an absolute path, a '..' part) or hide
    an output (a part starting with '.'), '\\' (a folder on one system, a name on another), and what
    str.format would do more with (conversions, format specs, other fields). Collisions between pairs
    are found by the plan, which knows the names."""
    if isinstance(v, dict):  # name: {style}/x unquoted is a YAML mapping
        raise _fail("name", 'must be a quoted text such as "{style}/{content}" (unquoted, YAML reads {...} '
                    "as a mapping)", source)
    if not isinstance(v, str) or not v.strip():
        raise _fail("name", f'must be a text such as "{{style}}/{{content}}", got {v!r}', source)
    try:
        parts = list(string.Formatter().parse(v))
    except ValueError as e:
        raise _fail("name", f"is not a valid template ({e}; a literal brace is written {{{{ or }}}}): {v!r}",
                    source) from None
    for _, field, spec, conv in parts:
        if field is not None and (field not in NAME_FIELDS or spec or conv):
            raise _fail("name", f"may use {', '.join('{' + f + '}' for f in NAME_FIELDS)} only, got "
                        f"{{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} in {v!r}", source)
    if v.startswith(("/", "~")) or "\\" in v or "\x00" in v or re.match(r"[A-Za-z]:", v):
        raise _fail("name", f"must be a path relative to the output folder, with '/' between folders, got {v!r}",
                    source)
    if any(seg.startswith(".") for seg in v.split("/")):  # '..' would leave the folder; '.x' hides the output
        raise _fail("name", f"must stay inside the output folder: no part may start with '.', got {v!r}", source)
    return v


def _style_size(n: str, v: Any, source: str) -> int | float | None:
    """An int is pixels (>= MIN_SIDE), a float a fraction of `size` in (0, 4]: the YAML type decides, so
    `0.5` and `256` cannot be confused; `256.0` is refused rather than guessed."""
    if v is None:
        return None
    if isinstance(v, float):
        if not 0 < v <= STYLE_FRACTION_MAX:
            hint = f"; for pixels write an integer ({int(v)})" if v.is_integer() and v >= MIN_SIDE else ""
            raise _fail(n, f"as a fraction of size must be in (0, {STYLE_FRACTION_MAX:g}], got {v:g}{hint}", source)
        return v
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < MIN_SIDE:
        raise _fail(n, f"is pixels when an integer (>= {MIN_SIDE}), got {v}; for a fraction of size write "
                       f"{float(v)}", source)
    return _int(n, v, source, lo=MIN_SIDE, hi=16384)


def _mapping(n: str, v: Any, source: str, example: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(n, f"must be a mapping, e.g. {example}, got {v!r}", source)
    for k in v:
        if not isinstance(k, str) or not k:
            raise _fail(n, f"keys must be non-empty text, got {k!r}", source)
    return v


def _per_style(v: Any, source: str) -> tuple:
    """{pattern: {key: value}} -> ((pattern, ((key, checked value), ...)), ...), each value checked as the
    top-level key is, an error naming per_style.<pattern>.<key>."""
    out = []
    for pattern, changes in _mapping("per_style", v, source, "{'starry*': {style_weight: 10}}").items():
        where = f"per_style.{pattern}"
        changes = _mapping(where, changes, source, "{style_weight: 10, style_size: 0.5}")
        if not changes:
            raise _fail(where, "sets nothing; give it keys to override, e.g. {style_weight: 10}", source)
        checked = []
        for key, value in changes.items():
            if key not in PER_STYLE_KEYS:
                raise _fail(f"{where}.{key}", f"cannot be set per style (these can: {', '.join(PER_STYLE_KEYS)})",
                            source)
            checked.append((key, _check(key, value, source, name=f"{where}.{key}")))
        out.append((pattern, tuple(checked)))
    return tuple(out)


_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def _blends(v: Any, source: str) -> tuple:
    """{name: {style file: weight}} -> ((name, ((file, weight), ...)), ...); weights > 0, files relative
    to the styles folder (that they exist is the plan's check)."""
    out = []
    for name, members in _mapping("blends", v, source, "{dusk: {starry_night.jpg: 2, the_great_wave.jpg: 1}}").items():
        where = f"blends.{name}"
        if _BAD_NAME.search(name) or name in (".", "..") or name.startswith("."):
            raise _fail(where, "must be a plain folder name (no '/', no leading '.'): it names the output folder",
                        source)
        members = _mapping(where, members, source, "{starry_night.jpg: 2, the_great_wave.jpg: 1}")
        if not members:
            raise _fail(where, "has no members; list style files with weights, e.g. {a.jpg: 1, b.jpg: 1}", source)
        checked = []
        for file, weight in members.items():
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise _fail(f"{where}.{file}", "must be a path relative to the styles folder", source)
            checked.append((file, _float(f"{where}.{file}", weight, source, lo=0, strict=True)))
        out.append((name, tuple(checked)))
    return tuple(out)


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
        v = _check(key, value, source)
        if key in _PATH_KEYS and base_dir is not None and not v.is_absolute():
            v = base_dir / v
        if key == "weights" and v not in WEIGHT_SOURCES and base_dir is not None:
            p = Path(v).expanduser()  # a state-dict path: relative to the manifest, like the folders
            v = str(p if p.is_absolute() else base_dir / p)
        checked[key] = v
    result = settings.replace(**checked)
    if result.bit_depth == 16 and result.format != "png":  # what the two keys say together
        raise _fail("bit_depth", f"16 needs format png (JPEG has 8 bits a channel), got format {result.format}", source)
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
