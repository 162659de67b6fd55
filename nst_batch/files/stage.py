"""The I/O stage around the engine: photos decoded and resized ahead of the compute, images encoded and
written behind it, on a pool of threads; and the style images the engine asks for by key.

Pillow releases the GIL while it decodes, resizes and encodes, so on a GPU the next pair's photo is ready
and the last pair's PNG is written while VGG runs: a run's wall time is about the larger of its compute
and its I/O, not their sum. A pair is marked done only after its file is on disk (the driver hears of it
through `finished`): a crash before that leaves it `running`, and it is redone.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config.manifest import Settings
from ..config.objective import MIN_SIDE
from ..errors import PairError
from .decode import PhotoMeta, load_rgb, photo_meta, to_tensor
from .encode import encode
from .layout import write_output

# Decoded style images kept, for targets at a size not seen yet (a photo of another shape): 4 bytes a
# pixel (2.9 MiB for 1071×712, 400 MB at max_megapixels 100), so only a few.
STYLE_IMAGES = 2

Photo = tuple[torch.Tensor, PhotoMeta]  # a photo at its working size, and what its output keeps of it


def load_photo(path: Path, size: int, max_megapixels: float) -> Photo:
    """A photo decoded (upright, sRGB) and resized so that its long side is `size`: the engine's input,
    (1, 3, H, W) in [0, 1]; PairError when it cannot be read or would be too small at that size."""
    im = load_rgb(Path(path), max_megapixels)
    return to_tensor(im, size), photo_meta(im)


class StyleImages:
    """The engine's style pixels (core.targets.StylePixels): a style's image by its cache key (its file's
    hash), decoded once and kept for the STYLE_IMAGES most recent styles, resized to the long side asked
    for, or more where the style's short side would be under VGG's minimum. A style that cannot be
    decoded raises its PairError each time it is asked for (kept, like an image). `add` says where a
    key's file is (run.jobs.job_for does, from the plan's paths); `meta` is what its decoding noted."""

    def __init__(self, max_megapixels: float, paths: dict[str, Path] | None = None):
        self.max_mp = max_megapixels
        self.paths: dict[str, Path] = dict(paths or {})
        self._images: OrderedDict[str, Any] = OrderedDict()  # key -> decoded image, or its PairError
        self._meta: dict[str, PhotoMeta] = {}  # key -> its notes (a broken ICC profile), kept for the run

    def add(self, key: str, path: Path) -> None:
        self.paths[key] = Path(path)

    def path(self, key: str) -> Path:
        return self.paths[key]

    def meta(self, key: str) -> PhotoMeta | None:
        return self._meta.get(key)

    def held(self) -> list[str]:
        return list(self._images)

    def _image(self, key: str):
        if key in self._images:
            self._images.move_to_end(key)
        else:
            while len(self._images) >= STYLE_IMAGES:
                self._images.popitem(last=False)
            try:
                self._images[key] = load_rgb(self.paths[key], self.max_mp)
                self._meta[key] = photo_meta(self._images[key])
            except PairError as e:
                self._images[key] = PairError(e.kind, f"style {e}")
        im = self._images[key]
        if isinstance(im, PairError):
            raise im
        return im

    def __call__(self, key: str, long_side: int) -> torch.Tensor:
        im = self._image(key)
        # A coarse scale of a small output could shrink a wide style under VGG's minimum: keep its
        # short side at MIN_SIDE at least (Gram matrices do not depend on the image size).
        side = max(long_side, math.ceil(MIN_SIDE * max(im.size) / min(im.size)))
        return to_tensor(im, side)


def encode_and_write(image: torch.Tensor, meta: PhotoMeta | None, settings: Settings, path: Path,
                     thumb: Path) -> float:
    enc = encode(image, meta, settings)
    return write_output(path, enc.data, (thumb, enc.thumb))


class IOStage:
    """Decodes ahead (the next pair's photo, or the next batch's photos; a photo decoded once for all its
    styles, since plans run photo by photo) and encodes and writes behind, on `workers` threads (Pillow
    releases the GIL: a batch of 64 photos decodes in parallel), while the caller computes."""

    def __init__(self, size: int, max_megapixels: float, workers: int | None = None):
        # Two threads at least (one decoding, one writing); more on a bigger machine, for whole batches.
        workers = workers or max(2, min(8, os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nst-io")
        self.size, self.max_mp = size, max_megapixels
        self.loads: dict[str, Future] = {}
        self.writes: list[tuple[Any, Future]] = []
        # The photo last handed out: plans run photo by photo, so its next styles reuse it (decoded once).
        self.last: tuple[str, Future] | None = None

    def _load(self, path: str) -> Photo:
        return load_photo(Path(path), self.size, self.max_mp)

    def prefetch(self, *paths: str) -> None:
        """Decode these photos ahead: the next pair's, or the next call's (a batch). Only these: photos
        looked ahead before and not taken (another worker took their pair) must not pile up in memory."""
        for other in [p for p in self.loads if p not in paths]:
            self.loads.pop(other).cancel()
        for path in paths:
            if path not in self.loads and (self.last is None or self.last[0] != path):
                self.loads[path] = self.pool.submit(self._load, path)

    def photo(self, path: str) -> Photo:
        """The photo at its working size and its PhotoMeta (PairError if it cannot be read: every one of
        its pairs fails with the same error, decoded once)."""
        if self.last is None or self.last[0] != path:
            fut = self.loads.pop(path, None)
            self.last = None  # before decoding: two photos in memory at most (this one and the look-ahead)
            if fut is None:
                fut = Future()
                try:
                    fut.set_result(self._load(path))
                except Exception as e:
                    fut.set_exception(e)
            self.last = (path, fut)
        return self.last[1].result()

    def write(self, tag: Any, image: torch.Tensor, meta: PhotoMeta | None, settings: Settings, path: Path,
              thumb: Path) -> None:
        """Encode `image` and write it (then its thumbnail) behind the compute; `finished` gives `tag` back."""
        self.writes.append((tag, self.pool.submit(encode_and_write, image, meta, settings, path, thumb)))

    def finished(self, wait: bool = False) -> Iterator[tuple[Any, BaseException | None, float]]:
        """Yield (tag, error, finished_at) for writes that are over (all of them if wait)."""
        still = []
        for tag, fut in self.writes:
            if wait or fut.done():
                error = fut.exception()
                yield tag, error, (time.time() if error else fut.result())
            else:
                still.append((tag, fut))
        self.writes = still

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
