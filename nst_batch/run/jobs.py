"""A claimed pair becomes an engine Job here, and only here, for every driver (local or a Ray actor), and
a made image's note is joined here from what decoding said of its photo and style(s)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..batch.ledger import Row
from ..batch.plan import Pair
from ..core.engine import Job, Made
from ..files.decode import PhotoMeta
from ..files.hashing import file_hash
from ..files.stage import StyleImages


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


def note_for(made: Made, photo: PhotoMeta | None, styles: StyleImages) -> str | None:
    """The Made's note, plus what colour management could not do (an unusable ICC profile): the photo or
    style (each member of a blend) is still used, as sRGB, and the pair says so."""
    job = made.job
    named = ([(f"style {styles.path(k).name}", styles.meta(k)) for k, _ in job.members]
             or [("style", styles.meta(job.style_key))])
    notes = [made.note] + [f"{what}: {meta.note}" for what, meta in [("photo", photo), *named]
                           if meta is not None and meta.note]
    return "; ".join(n for n in notes if n) or None
