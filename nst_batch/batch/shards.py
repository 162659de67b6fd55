"""Shard mode (SLURM arrays, Kubernetes indexed jobs): which pairs are shard K of N's, and where its files live.

A pair belongs to shard `sha256(content \\0 style) mod N`: its own names only, so adding photos or
styles never moves a pair that exists already, and every process of an array agrees without talking
to any other. Each shard keeps its ledger and loss log in OUT/shards/K-of-N/ (one writer host each,
so they can live on a network filesystem); the images go to the usual OUT/<style>/<content>.png.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError
from ..files.layout import LEDGER, SHARDS

# Kubernetes gives an indexed Job's pod its index (JOB_COMPLETION_INDEX) but not the Job's
# `completions`: the manifest passes that in this variable.
COUNT_ENV = "NST_SHARD_COUNT"
_FOLDER = re.compile(r"(\d+)-of-(\d+)")


@dataclass(frozen=True, order=True)
class Shard:
    count: int  # first: shards sort by count, then index
    index: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def folder(self, out: Path) -> Path:
        """Where this shard's ledger and loss log live."""
        return out / SHARDS / self.name

    def owns(self, content: str, style: str) -> bool:
        return shard_of(content, style, self.count) == self.index


def shard_of(content: str, style: str, count: int) -> int:
    """The shard of a pair, from its names only (never Python's hash(): it changes per process)."""
    digest = hashlib.sha256(f"{content}\0{style}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a whole number") from None


def _make(index: int, count: int, what: str) -> Shard:
    if count < 1:
        raise ConfigError(f"{what}: the shard count must be at least 1, not {count}")
    if not 0 <= index < count:
        raise ConfigError(f"{what}: shard index {index} is not in 0..{count - 1}")
    return Shard(count, index)


def parse(text: str, env: Mapping[str, str] | None = None) -> Shard:
    """`--shard K/N`, or `--shard auto`: from a SLURM array task's or a Kubernetes indexed Job's variables.

    SLURM: index (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, count
    SLURM_ARRAY_TASK_COUNT; `--array=0-63`, `1-64` and `0-126:2` all work, a list like `1,5,9` only
    when evenly spaced. Kubernetes: index JOB_COMPLETION_INDEX, count NST_SHARD_COUNT."""
    env = os.environ if env is None else env
    if text.strip() != "auto":
        k, slash, n = text.partition("/")
        if not slash:
            raise ConfigError(f"--shard: {text!r} is neither K/N (e.g. 3/64) nor auto")
        return _make(_int(k, "--shard"), _int(n, "--shard"), "--shard")
    if "SLURM_ARRAY_TASK_ID" in env:
        return _from_slurm(env)
    if "JOB_COMPLETION_INDEX" in env:
        if COUNT_ENV not in env:
            raise ConfigError(f"--shard auto: JOB_COMPLETION_INDEX is set but {COUNT_ENV} is not; set it to "
                              "the Job's completions")
        return _make(_int(env["JOB_COMPLETION_INDEX"], "JOB_COMPLETION_INDEX"), _int(env[COUNT_ENV], COUNT_ENV),
                     "JOB_COMPLETION_INDEX")
    raise ConfigError("--shard auto: neither SLURM_ARRAY_TASK_ID (a SLURM array task) nor JOB_COMPLETION_INDEX "
                      "(a Kubernetes indexed Job) is set; pass --shard K/N")


def _from_slurm(env: Mapping[str, str]) -> Shard:
    task = _int(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise ConfigError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; "
                          "pass --shard K/N")
    count = _int(env["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT")
    low = _int(env.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
    step = _int(env.get("SLURM_ARRAY_TASK_STEP", "1"), "SLURM_ARRAY_TASK_STEP")
    high = _int(env["SLURM_ARRAY_TASK_MAX"], "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
    # A list like --array=1,2,9 has indices that are not low + i * step: two tasks would share a shard.
    if step < 1 or (task - low) % step or (high is not None and low + (count - 1) * step != high):
        raise ConfigError(f"SLURM_ARRAY_TASK_ID: array tasks {low}..{high} (step {step}, {count} tasks) are not "
                          "evenly spaced; submit --array=0-N-1 or pass --shard K/N")
    return _make((task - low) // step, count, "SLURM_ARRAY_TASK_ID")


def found(out: Path) -> list[Shard]:
    """The shards that have a ledger in OUT, sorted by count then index."""
    try:
        names = os.listdir(out / SHARDS)
    except OSError:
        return []
    shards = []
    for n in names:
        m = _FOLDER.fullmatch(n)
        if m and (out / SHARDS / n / LEDGER).is_file():
            shards.append(Shard(int(m[2]), int(m[1])))
    return sorted(shards)


def _conflict(out: Path, shard: Shard | None) -> str | None:
    """Why `shard` (None: an unsharded run) cannot use OUT as it stands, or None."""
    others = sorted({s.count for s in found(out) if shard is None or s.count != shard.count})
    if shard is None:
        if others:
            return (f"{out} holds the ledgers of a run split into {', '.join(map(str, others))} shards "
                    f"({out / SHARDS}); run with --shard K/{others[0]} (or --shard auto), or use another output folder")
        return None
    if (out / LEDGER).is_file():
        return (f"{out} holds the ledger of an unsharded run ({out / LEDGER}); --shard {shard} needs an output "
                "folder of its own, or run without --shard")
    if others:
        return (f"{out} is split into {others[0]} shards, this run asks for {shard.count} (--shard {shard}); "
                f"use --shard K/{others[0]} or another output folder")
    return None


def check_layout(out: Path, shard: Shard | None) -> None:
    """ConfigError, naming both layouts, unless OUT is empty, unsharded (shard None) or split into shard.count."""
    why = _conflict(out, shard)
    if why:
        raise ConfigError(why)


def claim_layout(out: Path, shard: Shard | None) -> Path:
    """Check that OUT is unsharded (shard None) or split into shard.count shards, make the shard's
    folder, and return the folder of the ledger to open. ConfigError, naming both layouts, otherwise.

    Checked again after the folder is made: of two runs with different counts starting together on an
    empty OUT, each sees the other's folder, removes its own and stops, rather than both going on."""
    check_layout(out, shard)
    if shard is None:
        return out
    folder = shard.folder(out)
    new = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if new:
        # Seen by found() only once the ledger exists: a bare folder is a placeholder for this check.
        others = [n for n in os.listdir(out / SHARDS) if (m := _FOLDER.fullmatch(n)) and int(m[2]) != shard.count]
        if others or (out / LEDGER).is_file():
            try:
                folder.rmdir()
            except OSError:
                pass
            raise ConfigError(_conflict(out, shard) or f"{out}: another run with other shards ({', '.join(others)}) "
                              f"started at the same time as --shard {shard}; use one count per output folder")
    return folder
