"""pipeline.yaml -> `Settings`: every key checked, every error one line naming the key.

The manifest is the whole recipe of a run. CLI options and `--set KEY=VALUE` are
applied on top of it with the same checks, so a typo fails the same way wherever
it was typed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .objective import GATYS, Layers, LayersError
from .images import MIN_SIDE

WEIGHT_SOURCES = ("vgg19-caffe", "torchvision")


@dataclass(frozen=True)
class Settings:
    content: Path = Path("data/content")
    styles: Path = Path("data/styles")
    out: Path = Path("results")
    size: int = 512
    style_size: int | None = None
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
    log_every: int = 10
    scales: tuple[float, ...] = (0.5, 1.0)
    stop_window: int = 20
    stop_tolerance: float = 0.01
    precision: str = "auto"
    compile: bool = False
    batch: int = 1
    lease_s: float = 120.0
    max_megapixels: float = 100.0
    method: str = "auto"  # optimize | network | auto (issue 13: a learned per-style network)
    network_steps: int = 600  # training steps of a style's network
    refine_steps: int = 50  # L-BFGS steps at full size from the network's output

    def __post_init__(self) -> None:
        # Code may hand `layers` over as the manifest writes it (a preset name or a mapping): one type here.
        object.__setattr__(self, "layers", Layers.parse(self.layers))

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """As a manifest writes it (the ledger stores this, and recipes hash it)."""
        d = dataclasses.asdict(self)
        for k in ("content", "styles", "out"):
            d[k] = str(d[k])
        d["scales"] = list(self.scales)
        d["layers"] = self.layers.to_manifest()
        return d


KEYS = tuple(f.name for f in dataclasses.fields(Settings))
_PATH_KEYS = ("content", "styles", "out")


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


def _check(key: str, v: Any, source: str) -> Any:
    """Return the value of `key` converted to its Settings type, or raise ConfigError."""
    if key in _PATH_KEYS:
        if not isinstance(v, (str, Path)) or not str(v):
            raise _fail(key, f"must be a folder path, got {v!r}", source)
        return Path(v).expanduser()  # 'content: ~/Pictures' in a manifest: no shell expands it there
    if key == "size":
        return _int(key, v, source, lo=MIN_SIDE, hi=16384)
    if key == "style_size":
        return None if v is None else _int(key, v, source, lo=MIN_SIDE, hi=16384)
    if key in ("steps",):
        return _int(key, v, source, lo=1)
    if key == "optimizer":
        return _choice(key, v, source, ("lbfgs", "adam"))
    if key == "lr":
        return _float(key, v, source, lo=0, strict=True)
    if key == "layers":
        return _check_layers(v, source)
    if key in ("content_weight", "style_weight", "tv_weight"):
        return _float(key, v, source, lo=0, allow_none=True)
    if key == "pooling":
        return _choice(key, v, source, ("max", "avg"))
    if key == "init":
        return _choice(key, v, source, ("content", "noise"))
    if key == "weights":
        if not isinstance(v, str) or not v:
            raise _fail(key, f"must be vgg19-caffe, torchvision or a path to a state dict, got {v!r}", source)
        return v
    if key == "device":
        return _check_device(v, source)
    if key == "seed":
        return _int(key, v, source, lo=0)
    if key == "format":
        v = {"jpeg": "jpg"}.get(v, v)
        return _choice(key, v, source, ("png", "jpg"))
    if key == "quality":
        return _int(key, v, source, lo=1, hi=100)
    if key == "log_every":
        return _int(key, v, source, lo=1)
    if key == "scales":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v:
            raise _fail(key, f"must be a list of fractions of size ending with 1.0, e.g. [0.5, 1.0], got {v!r}", source)
        vals = tuple(_float(key, x, source, lo=0, strict=True) for x in v)
        if vals[-1] != 1.0 or any(x > 1.0 for x in vals) or list(vals) != sorted(vals):
            raise _fail(key, f"must rise to 1.0, e.g. [0.5, 1.0], got {list(vals)}", source)
        return vals
    if key == "batch":
        return _int(key, v, source, lo=1, hi=256)
    if key == "stop_window":
        return _int(key, v, source, lo=0)
    if key == "stop_tolerance":
        return _float(key, v, source, lo=0)
    if key == "precision":
        return _choice(key, v, source, ("auto", "fp32", "bf16"))
    if key == "compile":
        if not isinstance(v, bool):
            raise _fail(key, f"must be true or false, got {v!r}", source)
        return v
    if key == "lease_s":
        return _float(key, v, source, lo=1)
    if key == "max_megapixels":
        return _float(key, v, source, lo=0, strict=True)
    if key == "method":
        return _choice(key, v, source, ("optimize", "network", "auto"))
    if key == "network_steps":
        return _int(key, v, source, lo=1)
    if key == "refine_steps":
        return _int(key, v, source, lo=0)
    raise AssertionError(key)  # every Settings field is handled above


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
    return settings.replace(**checked)


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
