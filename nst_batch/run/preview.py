"""`nst-batch preview`: a few sample photos in every style at a few style weights, small and quick, so
the weight for each painting is chosen before a night is spent on a wrong guess.

A preview IS a run, of the same machinery on derived inputs under OUT/previews/: `photos/` holds
downscaled copies of the sample photos, `styles/<style>@<factor>/` one style per strength (a sub-folder
is one style), and the settings give each of those its `style_weight` through `per_style`. Resuming,
recipes and failure handling are the run's: a rerun makes nothing new, a new style makes only its cells.
The previews have their own ledger (OUT/previews/out): the run's ledger and outputs are never touched.
`preview.json` describes the grid for the pages (report/preview_pages.py), which must not import this layer.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..batch.plan import Pair, make_plan
from ..config.checks import STYLE_FRACTION_MAX
from ..config.manifest import Settings
from ..config.objective import objective_from
from ..errors import ConfigError, PairError
from ..files.decode import fit_long_side, load_rgb
from ..files.layout import PREVIEWS, write_atomic, write_text_atomic
from ..files.names import printable
from .progress import Display
from .drive import RunResult
from .local import run

PREVIEW_JSON = "preview.json"
# Measured (docs/benchmarks.md, Preview): the bundled 3 photos x 3 paintings x 3 strengths finish within
# 3 minutes on a loaded 2-core CPU at this size and these steps, and the strengths already differ clearly.
SIZE = 112
STEPS = 12
STRENGTHS = (1 / 3, 1.0, 3.0)
CANDIDATES = 256  # photos whose thumbnails are compared: a 10,000-photo collection is sampled evenly first


@dataclass(frozen=True)
class PreviewOptions:
    photos: int = 3
    names: tuple[str, ...] = ()  # --photo NAME: these photos instead of chosen ones
    strengths: tuple[float, ...] = STRENGTHS
    size: int = SIZE
    steps: int = STEPS


def parse_strengths(text: str) -> tuple[float, ...]:
    """'0.33,1,3' -> (0.33, 1.0, 3.0): positive factors, each once, in the order given."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not (v > 0 and np.isfinite(v)) for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--strengths: expected distinct positive factors like 0.33,1,3, got {text!r}")
    return values


# -- which photos --------------------------------------------------------------------------------------

def features(path: Path) -> tuple[float, ...] | None:
    """What makes photos look different under a style, from a tiny decoded thumbnail: brightness, contrast,
    colour (two opponent axes) and portrait vs landscape. None when it does not decode (the run says why)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at 1/8 scale: thousands of photos stay quick
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((32, 32))
    except Exception:
        return None
    a = np.asarray(im, dtype=np.float64) / 255.0
    lum = a @ [0.299, 0.587, 0.114]
    r, g, b = a[..., 0].mean(), a[..., 1].mean(), a[..., 2].mean()
    return (lum.mean(), lum.std(), r - g, (r + g) / 2 - b, 0.5 if im.height > im.width else 0.0)


def choose(files: list[Path], n: int, feats=features) -> list[Path]:
    """`n` photos that differ: first the one farthest from the average look, then each time the one
    farthest from every photo taken (farthest-point sampling). Deterministic: ties go to the earlier file."""
    if len(files) > CANDIDATES:
        files = [files[i * len(files) // CANDIDATES] for i in range(CANDIDATES)]
    known = [(p, f) for p in files if (f := feats(p)) is not None]
    if not known:
        return files[:n]
    x = np.array([f for _, f in known])
    dist = np.linalg.norm(x - x.mean(axis=0), axis=1)
    taken: list[int] = []
    while len(taken) < min(n, len(known)):
        i = int(np.argmax(dist))  # argmax: the first of equals
        taken.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[taken] = -1.0
    return [known[i][0] for i in sorted(taken)]


def named(files: list[Path], root: Path, names: tuple[str, ...]) -> list[Path]:
    """--photo NAME: a photo's path relative to the content folder, or its file name, or its stem."""
    out = []
    for name in names:
        hits = [p for p in files if name in (p.relative_to(root).as_posix(), p.name, p.stem)]
        if len(hits) != 1:
            some = ", ".join(p.relative_to(root).as_posix() for p in files[:5]) + (", ..." if len(files) > 5 else "")
            why = "names several photos; give its path" if hits else f"is not a photo in {root} (e.g. {some})"
            raise ConfigError(f"--photo {printable(name)}: {why}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


# -- the labels: per_style lines a user pastes ------------------------------------------------------------

def yaml_number(v: float) -> str:
    """A number as YAML reads it back as the same number: 4 significant digits, and an exponent with a
    point in its mantissa (YAML 1.1 reads '1e+06' as text)."""
    s = f"{v:.4g}"
    if "e" in s:
        mantissa, _, exp = s.partition("e")
        s = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exp}"
    return s


def _yaml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        s = yaml_number(v)
        return s if any(ch in s for ch in ".e") else s + ".0"  # style_size 1.0 is a fraction, 1 is a pixel
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)


def exact_pattern(name: str) -> str:
    """A per_style pattern matching this name only: glob characters in a name are bracketed."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def label(name: str, weight: float, others: tuple[tuple[str, object], ...]) -> str:
    """The manifest line that gives style `name` this weight (its other per_style settings kept)."""
    inner = ", ".join([f"style_weight: {yaml_number(weight)}"] + [f"{k}: {_yaml_value(v)}" for k, v in others])
    return f"per_style: {{{json.dumps(exact_pattern(name), ensure_ascii=False)}: {{{inner}}}}}"


def rounded(w: float) -> float:
    """The weight a label states (4 significant digits), so the cell shows exactly what pasting gives."""
    return float(yaml_number(w))


def base_weight(settings: Settings, overrides: tuple) -> float:
    """A style's style_weight now: its per_style one, else the manifest's, else its layers preset's."""
    own = dict(overrides).get("style_weight", settings.style_weight)
    return objective_from(settings.layers, style_weight=own).style_weight


# -- the derived inputs ------------------------------------------------------------------------------------

def _png(path: Path, long_side: int, max_megapixels: float) -> bytes:
    """The image decoded (upright, sRGB) and shrunk to `long_side` (never enlarged), as PNG bytes."""
    im = load_rgb(path, max_megapixels)
    w, h = fit_long_side(*im.size, min(long_side, max(im.size)))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    # Plain PNG, no profile (untagged is sRGB, which load_rgb made it): the sRGB profile lcms writes holds its
    # creation time, so each preview would write new bytes, new hashes, and remake every cell.
    im.save(buf, "PNG")
    return buf.getvalue()


def _put(path: Path, data: bytes, written: set[Path]) -> None:
    """Written only when changed: the same bytes keep the file's hash, so its cells stay done."""
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, lambda f: f.write(data))
    written.add(path)


def _prune(folder: Path, keep: set[Path]) -> None:
    """Derived inputs this preview no longer uses (a photo or style gone, another strength): away, so the
    preview's plan holds this preview's cells only. Only files under our own folder."""
    if not folder.is_dir():
        return
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif p not in keep:
            p.unlink()


def _style_size(settings: Settings, value):
    """A style_size in pixels means pixels of the run's size: the same fraction of the preview's size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return min(STYLE_FRACTION_MAX, value / settings.size)
    return value


@dataclass(frozen=True)
class Column:
    factor: float
    weight: float
    folder: str  # the preview style's name: <style>@<factor>
    label: str


def _folder_name(style: str, factor: float) -> str:
    return f"{style}@{factor:.3g}"


def _style_sources(pair: Pair) -> list[tuple[Path, str]]:
    """(image, file name in its preview sub-folder): one for a style file, every member for a blend."""
    if not pair.members:
        return [(pair.style_path, Path(pair.style_path.name).with_suffix(".png").name)]
    return [(m.path, f"{i:03d}_{m.path.stem}.png") for i, m in enumerate(pair.members)]


def _styles(settings: Settings, plan: list[Pair], display: Display) -> list[Pair]:
    """One pair per style, in the plan's order; a blend with unequal weights is left out (a sub-folder of
    copies blends its images equally), and said so."""
    firsts = list({p.style: p for p in reversed(plan)}.values())[::-1]
    out = []
    for p in firsts:
        if p.members and len({round(m.weight, 9) for m in p.members}) > 1:
            display.note(f"{printable(p.style)}: a blend of unequal weights is not previewed")
            continue
        out.append(p)
    return out


def derive(settings: Settings, opts: PreviewOptions, display: Display) -> tuple[Settings, dict]:
    """Write the preview's inputs under OUT/previews/ and return its settings and its grid description."""
    folder = settings.out / PREVIEWS
    plan = make_plan(settings, lambda path: "")  # names, styles and overrides; no file is read
    croot = settings.content.resolve()
    photos = list(dict.fromkeys(p.content_path for p in plan))
    chosen = named(photos, croot, opts.names) if opts.names else choose(photos, opts.photos)
    written: set[Path] = set()
    photo_names = {}
    for p in chosen:
        rel = p.relative_to(croot).with_suffix(".png").as_posix()
        rel = rel if rel not in photo_names.values() else p.relative_to(croot).as_posix() + ".png"
        try:
            _put(folder / "photos" / rel, _png(p, opts.size, settings.max_megapixels), written)
        except PairError as e:  # an unreadable sample is one the run would fail too: say so, use the others
            display.note(f"{printable(p.relative_to(croot).as_posix())}: left out of the preview: {e}")
            continue
        photo_names[p.relative_to(croot).as_posix()] = rel
    if not photo_names:
        raise ConfigError(f"no sample photo of {settings.content} could be decoded for the preview")
    per_style, grid = [], []
    for pair in _styles(settings, plan, display):
        over = dict(pair.overrides)
        others = tuple((k, v) for k, v in pair.overrides if k != "style_weight")
        cell = {k: _style_size(settings, v) if k == "style_size" else v for k, v in others if k != "steps"}
        style_px = settings.replace(size=opts.size, style_size=_style_size(settings, over.get(
            "style_size", settings.style_size))).style_px(opts.size)
        sources = [(name, _png(src, style_px, settings.max_megapixels)) for src, name in _style_sources(pair)]
        columns = []
        for factor in opts.strengths:
            weight = rounded(base_weight(settings, pair.overrides) * factor)
            name = _folder_name(pair.style, factor)
            for file_name, data in sources:
                _put(folder / "styles" / name / file_name, data, written)
            per_style.append((exact_pattern(name), tuple({**cell, "style_weight": weight}.items())))
            columns.append(Column(factor, weight, name, label(pair.style, weight, others)))
        grid.append((pair.style, sources[0][0], columns))
    for sub in ("photos", "styles"):
        _prune(folder / sub, written)
    preview = settings.replace(
        content=folder / "photos", styles=folder / "styles", out=folder / "out", size=opts.size, steps=opts.steps,
        scales=(1.0,), method="optimize", per_style=tuple(per_style), blends=(), name="{style}/{content}",
        format="png", bit_depth=8, keep_gps=False, compile=False,
        style_size=_style_size(settings, settings.style_size))
    return preview, _describe(preview, photo_names, grid)


def _describe(preview: Settings, photos: dict[str, str], grid: list) -> dict:
    """The grid as the pages read it (paths relative to OUT/previews/)."""
    outputs = {(p.content, p.style): f"out/{p.output}" for p in make_plan(preview, lambda path: "")}
    return {
        "size": preview.size, "steps": preview.steps,
        "photos": [{"name": name, "image": f"photos/{rel}"} for name, rel in photos.items()],
        "styles": [{"name": style, "image": f"styles/{cols[0].folder}/{first}",
                    "columns": [{"factor": c.factor, "weight": c.weight, "label": c.label,
                                 "outputs": [outputs[(rel, c.folder)] for rel in photos.values()]}
                                for c in cols]}
                   for style, first, cols in grid],
    }


def make_preview(settings: Settings, display: Display, opts: PreviewOptions = PreviewOptions()) -> RunResult:
    """Derive the preview's inputs, then make its cells with the run's own entry point (resumable: a
    rerun makes only the cells not done). Writes OUT/previews/preview.json for the pages."""
    preview, grid = derive(settings, opts, display)
    result = run(preview, display)
    write_text_atomic(settings.out / PREVIEWS / PREVIEW_JSON, json.dumps(grid, indent=1, ensure_ascii=False))
    return result

