"""Settings -> the ordered list of pairs to make, each with its output name and recipe hash.

Order is photo-major (every style for the first photo, then the next photo): the pairs of
one photo run back to back, so a worker decodes each photo once for all its styles, and the
engine keeps every style's (small) Gram targets for the run. The recipe hash covers everything that
changes an output's pixels, so the ledger can tell a finished pair from one whose inputs or settings
have since changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..files.layout import CONTACT_SHEET, MODELS, PREVIEWS, SHARDS, SHEETS, STYLES, THUMBS
from ..files.decode import scan
from ..files.hashing import file_hash
from ..config.manifest import Member, Overrides, Settings, check_folders
from ..config.settings import SETTINGS
from ..files.names import Skipped, printable, skipped_line

# Keys that do not change the pixels of an output (settings.py declares which): changing them redoes
# nothing. `name` moves an output: the ledger sees the new path and makes it there. method,
# network_steps and refine_steps are among them: an optimised pair keeps the plain recipe, and a
# network-made pair gets one of its own that covers them (methods.network_recipe).
NOT_IN_RECIPE = frozenset(k for k, s in SETTINGS.items() if not s.in_recipe)


@dataclass(frozen=True)
class Pair:
    content: str  # path relative to the content folder: the pair's name in logs and reports
    style: str  # a style file's path relative to the styles folder, a sub-folder's name, or a blend's name
    content_path: Path
    style_path: Path  # the style's (first) image: what the report shows for it
    output: str  # path relative to the output folder
    recipe: str
    style_hash: str  # a blend's: of its members' hashes and weights
    members: tuple[Member, ...] = ()  # a blend's members; () for a style file (style_path alone)
    overrides: Overrides = ()  # this style's per_style overrides


class Plan(list[Pair]):
    """The pairs in order, plus the input-folder entries left out (`skipped`), so they can be reported.

    A list, because that is what every consumer (ledger sync, retry, tests) walks.
    """

    def __init__(self, pairs: list[Pair], skipped: list[Skipped]):
        super().__init__(pairs)
        self.skipped = skipped


def _stems(root: Path, files: list[Path]) -> dict[Path, str]:
    """Relative path without suffix, unless two files would share it: then keep the suffix too."""
    rel = {p: p.relative_to(root) for p in files}
    bare = {p: r.with_suffix("").as_posix() for p, r in rel.items()}
    seen: dict[str, int] = {}
    for s in bare.values():
        seen[s.casefold()] = seen.get(s.casefold(), 0) + 1
    return _unique({p: (s if seen[s.casefold()] == 1 else f"{s}_{rel[p].suffix.lstrip('.').lower()}")
                    for p, s in bare.items()})


def _unique(names: dict[Any, str]) -> dict[Any, str]:
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
ENGINE_VERSION = 4  # 2: stop rule on every step, steps: 1 is one evaluation, L-BFGS recovers from a jump;
# 3: L-BFGS's first step moves pixels by 1% (it was invisible to a bf16 forward); inputs with an ICC
#    profile converted to sRGB, outputs carry the sRGB profile and the photo's EXIF
# 4: the optimiser changed: L-BFGS is core/lbfgs.py (each image its own history of 10 pairs, step and
#    stop rule; no line search), not torch's on a batch's summed loss; folders made earlier are redone once


_CONDITIONAL = {k for k, s in SETTINGS.items() if s.in_recipe and s.unless}


def recipe_settings(settings: Settings) -> dict:
    """The settings that change an output's pixels, and the engine version: a recipe hashes these and
    the two input files; workers sharing an output folder must agree on them (per_style and blends
    included: the run's whole recipe)."""
    d = {k: v for k, v in settings.to_dict().items() if k not in NOT_IN_RECIPE}
    for k in d.keys() & _CONDITIONAL:
        if SETTINGS[k].unless.test(settings):
            d.pop(k)  # e.g. quality of a PNG, or colors: style, what outputs had before the key existed
    d["engine"] = ENGINE_VERSION
    return d


def style_settings(settings: Settings, overrides: Overrides) -> Settings:
    """One style's settings: the run's, with its per_style overrides applied and the per-style tables
    themselves dropped (resolved into it). Its pairs' recipes hash these, so changing one style's
    override redoes that style's pairs only."""
    return settings.replace(per_style=(), blends=(), **dict(overrides))


def blend_hash(members: tuple[Member, ...]) -> str:
    """A blend's identity: every member's file hash and normalised weight, in order."""
    text = "\0".join(f"{m.hash}:{m.weight!r}" for m in members)
    return "blend:" + hashlib.sha256(text.encode()).hexdigest()


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
    cstem = _stems(croot, contents)
    hashed = {p: hashes(p) for p in contents + styles}
    recipes: dict[Overrides, Callable[[str, str], str]] = {}  # one settings encoding per distinct overrides
    # Per file once, not per pair: 10,000 photos x 20 styles is 200,000 pairs.
    cnames = [(c, c.relative_to(croot).as_posix(), cstem[c], hashed[c]) for c in contents]
    snames = []
    for st in _styles(settings, sroot, styles, hashed):
        if st.overrides not in recipes:
            recipes[st.overrides] = recipe_hasher(style_settings(settings, st.overrides))
        snames.append((st, recipes[st.overrides]))
    namer = output_namer(settings.name, settings.format)
    pairs = []
    for c, cname, stem, ch in cnames:
        name = namer(stem)
        for st, recipe in snames:
            pairs.append(Pair(content=cname, style=st.name, content_path=c, style_path=st.members[0].path,
                              output=name(st.folder), recipe=recipe(ch, st.hash), style_hash=st.hash,
                              members=st.members if st.blend else (), overrides=st.overrides))
    check_outputs(pairs)
    return Plan(pairs, skipped)


@dataclass(frozen=True)
class _Style:
    name: str  # Pair.style
    folder: str  # output folder
    members: tuple[Member, ...]
    hash: str
    blend: bool
    overrides: Overrides = ()


def _styles(settings: Settings, root: Path, files: list[Path], hashed: Mapping[Path, str]) -> list[_Style]:
    """The plan's styles, in order: each file at the top of the styles folder; each sub-folder, as ONE
    blend of every image under it, equally weighted; then each `blends` entry. Each with its per_style
    overrides (the first pattern matching its name)."""
    top: dict[str, list[Path]] = {}  # a top-level file's or sub-folder's name -> its images
    for p in files:
        top.setdefault(p.relative_to(root).parts[0], []).append(p)
    singles = {name: ps[0] for name, ps in top.items() if ps[0].parent == root}
    stems = _stems(root, list(singles.values()))
    folders = _unique({name: stems[singles[name]] if name in singles else name for name in top})
    out = []
    for name, ps in top.items():
        blend = name not in singles
        members = tuple(Member(p, 1 / len(ps), hashed[p]) for p in ps)
        out.append(_Style(name, folders[name], members, blend_hash(members) if blend else hashed[ps[0]], blend))
    by_rel = {p.relative_to(root).as_posix(): p for p in files}
    taken = {k.casefold() for st in out for k in (st.name, st.folder)}
    for name, weighted in settings.blends:
        if name.casefold() in taken:
            raise ConfigError(f"blends.{name}: a style is already named {name!r} in {root}; "
                              "give the blend another name (it names the output folder) (key 'blends')")
        taken.add(name.casefold())
        total = sum(w for _, w in weighted)
        members = []
        for rel, w in weighted:
            p = by_rel.get(Path(rel).as_posix())
            if p is None:
                raise ConfigError(f"blends.{name}: {rel!r} is not a style image in {root} (key 'blends.{name}.{rel}')")
            members.append(Member(p, w / total, hashed[p]))
        out.append(_Style(name, name, tuple(members), blend_hash(tuple(members)), True))
    return _with_overrides(settings, out)


def _matches(name: str, pattern: str) -> bool:
    """A style's own name always matches itself, even one with glob characters ("[1].jpg")."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _with_overrides(settings: Settings, styles: list[_Style]) -> list[_Style]:
    """Each style takes the overrides of the first per_style pattern (fnmatch, case-sensitive) matching its
    name. A pattern that takes no style, matching none or only styles an earlier one took, is an error:
    a typo must not silently do nothing."""
    if not settings.per_style:
        return styles
    taken = {p: [] for p, _ in settings.per_style}
    out = []
    for st in styles:
        hit = next(((p, ch) for p, ch in settings.per_style if _matches(st.name, p)), None)
        if hit is None:
            out.append(st)
            continue
        taken[hit[0]].append(st.name)
        out.append(_Style(st.name, st.folder, st.members, st.hash, st.blend, hit[1]))
    for pattern, names in taken.items():
        if not names:
            earlier = [p for p, _ in settings.per_style if p != pattern]
            shadowed = [st.name for st in styles if _matches(st.name, pattern)]
            why = (f"matches only styles an earlier pattern already sets ({', '.join(shadowed[:3])}): "
                   "put it before the more general one" if shadowed and earlier else
                   f"matches no style; the styles are: {', '.join(st.name for st in styles[:10])}"
                   + (", ..." if len(styles) > 10 else ""))
            raise ConfigError(f"per_style.{pattern}: {why} (key 'per_style.{pattern}')")
    return out


# -- output names ----------------------------------------------------------------------------------

# OUT's own folders (the report's thumbnails, pages and sheets; shards' ledgers; learned networks; the
# previews, a run of their own): an output inside one could be taken for, or deleted as, one of their files
# (the report removes sheets it did not write; a preview removes sample photos it no longer uses).
RESERVED = {THUMBS, STYLES, SHEETS, SHARDS, MODELS, PREVIEWS}


def output_namer(template: str, fmt: str) -> Callable[[str, str], Callable[[str], str]]:
    """content stem -> (style name -> output path relative to OUT), from the `name` template (checked by
    the manifest). {content} is the photo's relative path without suffix (made distinct by _stems),
    {photo} its last part, {folder} the rest ('' at the top: empty parts are dropped), {style} the
    style's folder name. The format's suffix is added. Rendered once per photo: per pair it is a join."""
    def for_photo(content: str) -> Callable[[str], str]:
        folder, _, photo = content.rpartition("/")
        # NUL stands for the style: no file name holds one, and the manifest refuses one in a template.
        path = template.format(style="\x00", content=content, photo=photo, folder=folder)
        pieces = ("/".join(part for part in path.split("/") if part) + f".{fmt}").split("\x00")
        return lambda style: style.join(pieces)

    return for_photo


def check_outputs(pairs: list[Pair]) -> None:
    """Refuse, at plan time, two pairs with one output (compared ignoring case: one file on macOS and
    Windows), an output that is another's folder, and an output among OUT's own files. Set operations
    first: 200,000 pairs are checked in a fraction of a second, and only a refusal looks for its pairs."""
    keys = [p.output.casefold() for p in pairs]
    files = set(keys)
    folders = {k.rpartition("/")[0] for k in keys}
    folders |= {f.rsplit("/", n)[0] for f in list(folders) for n in range(1, f.count("/") + 1)}
    reserved = {k for k in folders if k.partition("/")[0] in RESERVED} or (files & {CONTACT_SHEET})
    # An empty part, or one starting with '.' ('..'; '.png' from "{folder}" at the top level), leaves OUT or
    # hides the file.
    bad = {k for k in files if "/." in "/" + k or "//" in "/" + k}
    if len(files) == len(keys) and not (files & folders) and not reserved and not bad:
        return
    first: dict[str, Pair] = {}
    for p, key in zip(pairs, keys):
        parts = key.split("/")
        if not all(parts) or any(part.startswith(".") for part in parts):
            raise ConfigError(f"{printable(p.style)} × {printable(p.content)}: output {printable(p.output)} would "
                              "be hidden or outside the output folder (key 'name')")
        if (len(parts) > 1 and parts[0] in RESERVED) or key == CONTACT_SHEET:
            raise ConfigError(f"{printable(p.style)} × {printable(p.content)}: output {printable(p.output)} "
                              f"is among the output folder's own files (key 'name'; {', '.join(sorted(RESERVED))}/ "
                              f"and {CONTACT_SHEET} are nst-batch's)")
        if key in first:
            raise _clash(first[key], p, f"would both be written to {printable(p.output)}")
        first[key] = p
    for p, key in zip(pairs, keys):
        for i in range(1, key.count("/") + 1):
            if (folder := key.rsplit("/", i)[0]) in first:
                raise _clash(first[folder], p, f"collide: {printable(first[folder].output)} would be a file and "
                             "a folder")


def _clash(a: Pair, b: Pair, what: str) -> ConfigError:
    return ConfigError(f"{printable(a.style)} × {printable(a.content)} and {printable(b.style)} × "
                       f"{printable(b.content)} {what} (key 'name': a template needs {{style}} and {{content}}, "
                       "or {photo} with {folder}, to keep pairs apart)")
