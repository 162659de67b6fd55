"""How much memory a pair needs, how much there is, and the largest size that would fit.

A pair's peak is at its finest scale: VGG19's forward and backward up to the objective's last layer
(activations kept for the gradient, at every layer's resolution: a fixed number of bytes per pixel of
the image), the optimiser's state (core/lbfgs.py keeps two image-sized vectors per curvature pair, at
most HISTORY = 10 pairs and one an iteration, and a few more per image), and a constant. Measured on the CPU (benchmarks/bench_memory.py, docs/benchmarks.md "Print
sizes"); a GPU with bf16 autocast keeps some activations in half the bytes, so the fp32 figure
over-predicts there, which errs on the side of running.

The engine compares `need` with `free_bytes(device)` before a pair starts: on Linux a CPU run that
asks for more than there is raises nothing, the kernel kills the process (and every pair in flight
with it), so the check has to come first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config.objective import MIN_SIDE
from ..files.decode import fit_long_side

MiB = 1 << 20
GiB = 1 << 30

# Bytes per pixel of the finest scale for VGG19's forward + backward at the objective's last layer, fp32,
# and the process's growth over a pair that does not scale with pixels. Fitted to the CPU measurements in
# docs/benchmarks.md "Print sizes" (gatys, last layer relu5_1; the L-BFGS history of the measured runs is
# taken out first). Objectives ending earlier need less: this bound serves them all.
VGG_BYTES_PER_PX = 2250
CONSTANT_BYTES = 400 * MiB
VECTOR_BYTES_PER_PX = 3 * 4  # one RGB float32 image-sized vector
# lbfgs.State's other image-sized vectors per image: x, g, d, best_x, and the trial point, its gradient,
# the step and the gradient change of an iteration.
LBFGS_STATE_VECTORS = 8


@dataclass(frozen=True)
class Need:
    """The predicted peak of one batch at its working shape."""

    bytes: int
    height: int
    width: int
    batch: int


def optimiser_bytes_per_px(optimizer: str, steps: int) -> int:
    """L-BFGS: 2·m vectors (m = the pairs optimize._lbfgs_scale allocates: one an iteration, at most
    lbfgs.HISTORY) and its state's own; Adam: two moments."""
    if optimizer != "lbfgs":
        return 2 * VECTOR_BYTES_PER_PX
    from .lbfgs import HISTORY  # imports torch: only once a need is asked for (this module stays light)

    m = max(1, min(HISTORY, steps - 1))
    return (2 * m + LBFGS_STATE_VECTORS) * VECTOR_BYTES_PER_PX


def need(height: int, width: int, batch: int, optimizer: str, steps: int) -> Need:
    per_px = VGG_BYTES_PER_PX + optimiser_bytes_per_px(optimizer, steps)
    return Need(batch * height * width * per_px + CONSTANT_BYTES, height, width, batch)


# `batch: auto` fills at most this share of the free memory: the model is fitted on a CPU in fp32 (it errs
# high under bf16), but cuDNN's workspaces, a CUDA graph's pool and the allocator's fragmentation are not in it.
AUTO_SHARE = 0.8


def auto_batch(height: int, width: int, optimizer: str, steps: int, free: int | None, most: int) -> int:
    """How many photos of this working shape `batch: auto` puts in one batch: as many as `need` fits in
    AUTO_SHARE of `free` bytes, at most `most`, at least 1 (free None, unknown: 1)."""
    if free is None:
        return 1
    per_image = need(height, width, 1, optimizer, steps).bytes - CONSTANT_BYTES
    return max(1, min(most, int((AUTO_SHARE * free - CONSTANT_BYTES) // per_image)))


def largest_fitting(image_w: int, image_h: int, free: int, batch: int, optimizer: str, steps: int,
                    below: int) -> int | None:
    """The largest long side under `below` (a multiple of 16) whose need fits in `free` bytes, for a photo
    of this shape; None when not even MIN_SIDE px fits."""
    per_px = VGG_BYTES_PER_PX + optimiser_bytes_per_px(optimizer, steps)
    aspect = min(image_w, image_h) / max(image_w, image_h)
    room = (free - CONSTANT_BYTES) / (batch * per_px)
    if room <= 0:
        return None
    side = min(below - 1, int(math.sqrt(room / aspect)))
    side -= side % 16  # a round number to type into 'size'
    while side >= MIN_SIDE:
        w, h = fit_long_side(image_w, image_h, side)
        if min(w, h) >= MIN_SIDE and need(h, w, batch, optimizer, steps).bytes <= free:
            return side
        side -= 16
    return None


def gb(n: float) -> str:
    """Bytes as people read a machine's memory: decimal GB (a "16 GB" machine), MB below one."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


# -- what is free --------------------------------------------------------------------------------------

def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages, which leaves out the reclaimable cache (errs on the low side)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup (a container, a Kubernetes pod, a SLURM job) still allows:
    its limit less what it uses, page cache it could drop counted as room. None: no limit."""
    for limit_f, used_f, stat_f in (("memory.max", "memory.current", "memory.stat"),  # cgroup v2
                                    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                     "memory/memory.stat")):  # v1
        try:
            raw = (root / limit_f).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:  # v2 says max, v1 a huge number
                return None
            used = int((root / used_f).read_text())
            cache = 0
            for line in (root / stat_f).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k in ("inactive_file", "total_inactive_file"):
                    cache = int(v)
            return max(0, int(raw) - used + cache)
        except (OSError, ValueError):
            continue
    return None


def free_bytes(device) -> int | None:
    """Bytes a new pair can still use on `device` (a torch.device); None when this cannot be told
    (MPS, an unknown OS), and then nothing is refused."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but no tensor uses are free for us, not for the driver.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        avail = _meminfo_available()
        room = _cgroup_room()
        if avail is None or room is None:
            return avail if room is None else room
        return min(avail, room)
    return None


FreeMemory = Callable[[object], "int | None"]
