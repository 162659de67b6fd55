"""Settings -> the ordered list of pairs to make, each with its output name and recipe hash.

Order is photo-major (every style for the first photo, then the next photo): the pairs of
one photo run back to back, so a worker decodes each photo once for all its styles, and the
engine keeps every style's (small) Gram targets for the run. The recipe hash covers everything that changes an output's pixels, so the ledger
can tell a finished pair from one whose inputs or settings have since changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import ConfigError
from .images import scan
from .manifest import Settings, check_folders
from .names import Skipped, skipped_line

# Keys that do not change the pixels of an output: changing them redoes nothing.
NOT_IN_RECIPE = {"content", "styles", "out", "device", "log_every", "lease_s", "compile", "max_megapixels"}
# How a pair is made (issue 13): a pair made by a network gets a recipe of its own (training.network_recipe,
# over its model's recipe and refine_steps); one made by optimisation keeps the plain recipe, so folders
# made before these keys existed are not redone.
NOT_IN_RECIPE |= {"method", "network_steps", "refine_steps"}


@dataclass(frozen=True)
class Pair:
    content: str  # path relative to the content folder: the pair's name in logs and reports
    style: str
    content_path: Path
    style_path: Path
    output: str  # path relative to the output folder
    recipe: str
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


Known = Mapping[str, tuple[int, int, str]]  # absolute path -> (size, mtime_ns, hash) of an earlier plan
# A file changed again within its mtime's granularity (2 s on FAT) after being hashed would keep its
# size and mtime: hashes of files this young are used but never kept (git's "racily clean" rule).
RACY_NS = 2_000_000_000


class HashCache:
    """file -> hash, read from disk only when its (size, mtime_ns) differ from those `known` from an
    earlier plan (the ledger keeps them). Like make and rsync, an edit that keeps both is not seen.

    Call it as make_plan's `hashes`; then `changes()` says what to store for the next plan."""

    def __init__(self, known: Known | None = None, read: Callable[[Path], str] = file_hash):
        self.known = dict(known or {})
        self.read = read
        self.seen: dict[str, tuple[int, int, str]] = {}  # what to keep: files of this plan, not too young
        self._young_after = time.time_ns() - RACY_NS

    def __call__(self, path: Path) -> str:
        key = str(path)
        try:
            st = os.stat(path)  # before reading: a change after it shows as a new mtime next time
        except OSError:
            return self.read(path)
        sig = (st.st_size, st.st_mtime_ns)
        old = self.known.get(key)
        h = old[2] if old is not None and (old[0], old[1]) == sig else self.read(path)
        # An unreadable file may become readable by chmod, which leaves mtime alone: never kept.
        if not h.startswith("unreadable:") and st.st_mtime_ns < self._young_after:
            self.seen[key] = (*sig, h)
        return h

    def changes(self) -> tuple[dict[str, tuple[int, int, str]], list[str]]:
        """(entries to write, paths to forget): nothing at all when no file changed."""
        put = {k: v for k, v in self.seen.items() if self.known.get(k) != v}
        return put, [k for k in self.known if k not in self.seen]


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


def recipe_hasher(settings: Settings) -> Callable[[str, str], str]:
    """(content_hash, style_hash) -> recipe, with the settings encoded once: 200,000 pairs cost one
    sha256 each, not one JSON encoding each."""
    head = json.dumps(recipe_settings(settings), sort_keys=True, default=str)
    return lambda c, s: hashlib.sha256(f"{head}\0{c}\0{s}".encode()).hexdigest()[:16]


def recipe_hash(settings: Settings, content_hash: str, style_hash: str) -> str:
    return recipe_hasher(settings)(content_hash, style_hash)


def make_plan(settings: Settings, hashes: Callable[[Path], str] = file_hash) -> Plan:
    """`hashes` gives each input file's hash: file_hash reads every file; a HashCache with what
    the ledger remembers reads only the files that changed since."""
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
    hashed = {p: hashes(p) for p in contents + styles}
    recipe = recipe_hasher(settings)
    # Per file once, not per pair: 10,000 photos x 20 styles is 200,000 pairs.
    cnames = [(c, c.relative_to(croot).as_posix(), f"{cstem[c]}.{settings.format}", hashed[c]) for c in contents]
    snames = [(s, s.relative_to(sroot).as_posix(), sstem[s], hashed[s]) for s in styles]
    pairs = []
    for c, cname, cfile, ch in cnames:
        for s, sname, sdir, sh in snames:
            pairs.append(Pair(content=cname, style=sname, content_path=c, style_path=s,
                              output=f"{sdir}/{cfile}", recipe=recipe(ch, sh), style_hash=sh))
    return Plan(pairs, skipped)
