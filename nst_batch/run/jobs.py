"""A claimed pair becomes an engine Job here, and only here, for every driver (local or a Ray actor), and
a made image's note is joined here from what decoding said of its photo and style(s). Outside a run (a
benchmark, a test, a sheet) a photo file and a style file become a Job here too (`file_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..batch.ledger import Row
from ..batch.plan import Pair
from ..config.manifest import Member, Settings
from ..core.engine import Engine, Job, Made, bucket_shape
from ..files.decode import PhotoMeta, working_shape
from ..files.hashing import file_hash
from ..files.stage import StyleImages, load_photo


def job_for(row: Row, pair: Pair | None, photo: torch.Tensor, styles: StyleImages) -> Job:
    """The engine's job for a claimed row, its photo already at its working size. The plan's style hash
    keys the engine's style cache (a row the plan does not hold is keyed by its style file's hash), and the
    plan's pair says what a blend is made of and the style's per_style overrides; `styles` learns where
    each key's file is, so the engine can ask for it by key."""
    if pair is None:
        key = file_hash(Path(row.style_path))
        styles.add(key, Path(row.style_path))
        return Job(row.content, row.style, photo, key)
    members = tuple((m.hash or file_hash(m.path), m.weight) for m in pair.members)
    for m, (key, _) in zip(pair.members, members):
        styles.add(key, m.path)
    if not members:
        styles.add(pair.style_hash, Path(row.style_path))
    return Job(row.content, row.style, photo, pair.style_hash, members=members, overrides=pair.overrides)


class Shapes:
    """Each photo's working shape (its decoded size, bucketed as the engine does: engine.bucket_shape), read
    from its header once a run, so the drive claims a batch of one style AND one shape: the engine makes a
    batch per shape, and a call of mixed shapes would be several small launches."""

    def __init__(self, size: int, bucket: int):
        self.size, self.bucket = size, bucket
        self._known: dict[str, tuple[int, int] | None] = {}

    def __call__(self, path: str) -> tuple[int, int] | None:
        if path not in self._known:
            hw = working_shape(Path(path), self.size)
            self._known[path] = None if hw is None else bucket_shape(*hw, self.bucket)
        return self._known[path]

    def like(self, path: str) -> Callable[[str], bool]:
        """Whether a photo goes in one batch with `path`'s. A photo whose header cannot be read goes with
        any: its decoding fails its own pair, whatever batch it is in."""
        want = self(path)
        return lambda p: want is None or self(p) in (want, None)


def note_for(made: Made, photo: PhotoMeta | None, styles: StyleImages) -> str | None:
    """The Made's note, plus what colour management could not do (an unusable ICC profile): the photo or
    style (each member of a blend) is still used, as sRGB, and the pair says so."""
    job = made.job
    named = ([(f"style {styles.path(k).name}", styles.meta(k)) for k, _ in job.members]
             or [("style", styles.meta(job.style_key))])
    notes = [made.note] + [f"{what}: {meta.note}" for what, meta in [("photo", photo), *named]
                           if meta is not None and meta.note]
    return "; ".join(n for n in notes if n) or None


# -- outside a run: a photo file and a style file (benchmarks, tests, sheets) ------------------------

def file_engine(settings: Settings, **kw) -> Engine:
    """An Engine whose style images are files (a StyleImages, `engine.style_pixels`), which `file_job`
    tells where each style's file is."""
    return Engine(settings, style_pixels=StyleImages(settings.max_megapixels), **kw)


def file_job(engine: Engine, content_path: Path, style_path: Path, *, content: str | None = None,
             style: str | None = None, key: str | None = None, members: tuple[Member, ...] = (),
             photo: torch.Tensor | None = None, **kw) -> Job:
    """The Job of a photo file and a style file (or a blend of manifest.Members) with no plan or ledger,
    decoded at the engine's size as the I/O stage does; the style keyed by `key`, else by its file's hash
    (a member by its own hash). `kw`: the Job's overrides, method, model."""
    s = engine.settings
    styles = engine.style_pixels
    if photo is None:
        photo = load_photo(Path(content_path), s.size, s.max_megapixels)[0]
    weighted = tuple((m.hash or file_hash(m.path), m.weight) for m in members)
    for m, (k, _) in zip(members, weighted):
        styles.add(k, m.path)
    key = key or file_hash(Path(style_path))
    if not members:
        styles.add(key, Path(style_path))
    return Job(content or Path(content_path).name, style or Path(style_path).name, photo, key, members=weighted, **kw)
