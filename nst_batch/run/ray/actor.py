"""The Ray actor: one Engine on one GPU (or CPU) for its lifetime, making pairs and training chunks."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from ...batch.ledger import Row
from ...batch.plan import Pair
from ...config.manifest import Settings
from ...core.engine import Engine
from ...errors import NstError, PairError
from ...files.encode import encode
from ...files.stage import StyleImages, load_photo
from .. import training
from ..jobs import job_for, note_for
from ..local import record_of
from ..record import Record, failure


class EngineWorker:
    """A Ray actor: one Engine for its lifetime; Ray runs its calls one at a time, in order. A setup
    error (missing weights, no such device) is kept and reported by `ready`, not raised, so the
    driver can print it as one line and exit with its code."""

    def __init__(self, settings: Settings, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.error: tuple[int, str] | None = None
        self.engine: Engine | None = None
        self.decoded: dict = {}  # the photos of the training chunks of one style, kept between its chunks
        self.decoded_for: tuple | None = None
        try:
            self.engine = Engine(settings, style_pixels=StyleImages(settings.max_megapixels))
        except NstError as e:
            self.error = (e.exit_code, str(e))

    def ready(self) -> tuple[Any, ...]:
        """("ok", resolved settings, device, pid) or ("error", exit code, message)."""
        if self.error is not None:
            return ("error", *self.error)
        return ("ok", self.engine.settings, str(self.engine.device), os.getpid())

    def make(self, claimed: list[tuple[Row, Pair | None, str]], model: tuple[str, list] | None = None) -> list[Record]:
        """The actor's call into the engine for pairs: each photo decoded here (once for all its styles; only the
        inputs need be visible to every node), the jobs made as a local run makes them (jobs.job_for) with the
        method each row was claimed for, each image encoded where it was made (the file carries the photo's
        metadata, read where it was decoded). `model`: (recipe, [its state's object ref]) for network rows,
        fetched only by an actor that has not loaded it yet (a restarted one has not)."""
        import ray

        s, styles = self.engine.settings, self.engine.style_pixels
        photos: dict[str, Any] = {}  # path -> (tensor, PhotoMeta), or the PairError decoding it raised
        ends: dict[int, Record] = {}
        jobs, metas = [], []
        for i, (row, pair, method) in enumerate(claimed):
            if row.content_path not in photos:
                try:
                    photos[row.content_path] = load_photo(Path(row.content_path), s.size, s.max_megapixels)
                except PairError as e:
                    photos[row.content_path] = e
            got = photos[row.content_path]
            if isinstance(got, PairError):
                ends[i] = failure(got.kind, str(got))
                continue
            job = job_for(row, pair, got[0], styles)
            if method == "network":
                job = dataclasses.replace(job, method=method, model=model[0])
                if not self.engine.has_model(job):
                    self.engine.load_model(job, ray.get(model[1][0]))
            jobs.append((i, job))
            metas.append(got[1])
        t0 = time.perf_counter()
        made = self.engine.make([j for _, j in jobs])
        took = time.perf_counter() - t0
        for (i, _), m, meta in zip(jobs, made, metas):
            if m.ok:
                m.note = note_for(m, meta, styles)
                enc = encode(m.image, meta, s)
                ends[i] = record_of(m, enc.data, enc.thumb, took)
            else:
                ends[i] = record_of(m, seconds=took)
        return [ends[i] for i in range(len(claimed))]

    def train(self, row: Row, pair: Pair | None, model: str, chunk: training.Chunk) -> tuple:
        """One chunk of a style's training (training.train_chunk; the photos read here by path): ("ok", state,
        curve rows, photos used), or ("error", kind, message) for a training that fails its style."""
        import torch

        job = dataclasses.replace(job_for(row, pair, torch.zeros(1, 3, 1, 1), self.engine.style_pixels),
                                  method="network", model=model)
        if self.decoded_for != chunk.photos:
            self.decoded, self.decoded_for = {}, chunk.photos
        try:
            return ("ok", *training.train_chunk(self.engine, job, chunk, self.decoded))
        except training.TRAINING_ERRORS as e:
            err = training.training_error(chunk.style, e)
            return ("error", err.kind, str(err))


