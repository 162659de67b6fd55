"""Settings -> the ordered list of pairs to make, each with its output name and recipe hash.

Order is style-major (every content for the first style, then the next style): pairs
that share a style run back to back, which is what the style-target cache and batching
want. The recipe hash covers everything that changes an output's pixels, so the ledger
can tell a finished pair from one whose inputs or settings have since changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .images import scan
from .manifest import Settings, check_folders
from .names import Skipped, skipped_line

# Keys that do not change the pixels of an output: changing them redoes nothing.
NOT_IN_RECIPE = {"content", "styles", "out", "device", "log_every", "lease_s", "compile", "max_megapixels"}


@dataclass(frozen=True)
class Pair:
    content: str  # path relative to the content folder: the pair's name in logs and reports
    style: str
    content_path: Path
    style_path: Path
    output: str  # path relative to the output folder
    recipe: str
    content_hash: str
    style_hash: str


class Plan(list[Pair]):
    """The pairs in order, plus the input-folder entries left out (`skipped`), so they can be reported.

    A list, because that is what every consumer (ledger sync, retry, tests) walks.
    """

    def __init__(self, pairs: list[Pair], skipped: list[Skipped]):
        super().__init__(pairs)
        self.skipped = skipped


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:  # unreadable files still get a pair; it fails with a reason when run
        return f"unreadable:{e.errno}"
    return h.hexdigest()


def _stems(root: Path, files: list[Path]) -> dict[Path, str]:
    """Relative path without suffix, unless two files would share it: then keep the suffix too."""
    rel = {p: p.relative_to(root) for p in files}
    bare = {p: r.with_suffix("").as_posix() for p, r in rel.items()}
    seen: dict[str, int] = {}
    for s in bare.values():
        seen[s.casefold()] = seen.get(s.casefold(), 0) + 1
    return _unique({p: (s if seen[s.casefold()] == 1 else f"{s}_{rel[p].suffix.lstrip('.').lower()}")
                    for p, s in bare.items()})


def _unique(names: dict[Path, str]) -> dict[Path, str]:
    """Names made distinct, ignoring case (one file on macOS/Windows), by adding _2, _3, ... in file order.

    A suffixed or flattened name can equal another file's own name (a.jpg -> a_jpg and a_jpg.png).
    """
    taken: set[str] = set()
    out = {}
    for p, name in names.items():
        cand, n = name, 1
        while cand.casefold() in taken:
            n += 1
            cand = f"{name}_{n}"
        taken.add(cand.casefold())
        out[p] = cand
    return out


# Bump when a code change alters the pixels the same settings produce, so finished folders are redone.
ENGINE_VERSION = 2  # 2: stop rule on every step, steps: 1 is one evaluation, L-BFGS recovers from a jump


def recipe_settings(settings: Settings) -> dict:
    """The settings that change an output's pixels, and the engine version: a recipe hashes these and
    the two input files; workers sharing an output folder must agree on them."""
    d = {k: v for k, v in settings.to_dict().items() if k not in NOT_IN_RECIPE}
    if settings.format != "jpg":
        d.pop("quality")  # PNG ignores it: changing it must not redo PNGs
    d["engine"] = ENGINE_VERSION
    return d


def recipe_hash(settings: Settings, content_hash: str, style_hash: str) -> str:
    d = recipe_settings(settings)
    d.update(content=content_hash, style=style_hash)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_plan(settings: Settings) -> Plan:
    check_folders(settings)
    found = {}
    skipped: list[Skipped] = []
    for key in ("content", "styles"):
        root: Path = getattr(settings, key)
        result = scan(root, key, skip=settings.out)
        skipped += result.skipped
        if not result.files:
            why = skipped_line(result.skipped)  # e.g. all of them HEIC, without the heif extra
            raise ConfigError(f"no images found in {key} folder {root} (key '{key}')" + (f"; {why}" if why else ""))
        found[key] = (root.resolve(), result.files)
    (croot, contents), (sroot, styles) = found["content"], found["styles"]
    # One folder per style, flat, so a style in a subfolder cannot collide with a content path.
    cstem = _stems(croot, contents)
    sstem = _unique({p: s.replace('/', '__') for p, s in _stems(sroot, styles).items()})
    hashes = {p: file_hash(p) for p in contents + styles}
    pairs = []
    for s in styles:
        for c in contents:
            pairs.append(Pair(
                content=c.relative_to(croot).as_posix(), style=s.relative_to(sroot).as_posix(),
                content_path=c, style_path=s,
                output=f"{sstem[s]}/{cstem[c]}.{settings.format}",
                recipe=recipe_hash(settings, hashes[c], hashes[s]),
                content_hash=hashes[c], style_hash=hashes[s],
            ))
    return Plan(pairs, skipped)
