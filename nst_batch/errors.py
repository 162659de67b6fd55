"""Errors the user can act on, each with the exit code the CLI documents.

Anything raised as an `NstError` is printed as one line, without a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PAIRS_FAILED = 1
EXIT_USAGE = 2
EXIT_WEIGHTS = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class NstError(Exception):
    exit_code = EXIT_USAGE


class ConfigError(NstError):
    """Bad manifest key, bad option value, missing or empty folder."""


class WeightsError(NstError):
    """The model weights could not be found or do not fit VGG19."""

    exit_code = EXIT_WEIGHTS


class PairError(Exception):
    """One pair cannot be made; the run records it and goes on.

    `kind` is a short stable word (`unreadable`, `too_small`, `too_large`,
    `nonfinite`, `no_progress`, `oom`, `write`, `internal`, `worker_lost`) that `nst-batch retry --kind`
    filters on. `worker_lost`: the Ray actor computing the pair died or hung 3 times (run/drive.py, LOST_LIMIT).
    `no_progress`: the final loss is not 0.5% below the loss of the unchanged photo, so the image
    would not be a stylization (optimize.progress_error).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
