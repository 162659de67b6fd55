"""The device and everything that depends on it, decided once (`resolve`): precision, memory layout,
cuDNN. The plan's recipe and the optimiser both read its answer, so they never disagree."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.manifest import Settings
from ..config.settings import AUTO_BATCH_MAX
from ..errors import ConfigError
from .optimize import OptimConfig
from .pyramid import auto_scales


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' asked for, but PyTorch sees no CUDA GPU (key 'device')")
        idx = int(name.partition(":")[2] or 0)
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' asked for, but there are {torch.cuda.device_count()} GPUs (key 'device')")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but this PyTorch has no MPS support here (key 'device')")
    return torch.device(name)


def optim_config(settings: Settings, channels_last: bool) -> OptimConfig:
    """The optimiser's settings, all read from resolved Settings (precision fp32 or bf16): the only place
    an OptimConfig is made from Settings, so the two can never disagree on a default."""
    if settings.precision not in ("fp32", "bf16") or isinstance(settings.scales, str):
        raise ValueError(f"precision {settings.precision!r} or scales {settings.scales!r} not resolved yet: use resolve()")
    return OptimConfig(
        steps=settings.steps, optimizer=settings.optimizer, lr=settings.lr, scales=settings.scales,
        init=settings.init, seed=settings.seed, log_every=settings.log_every, stop_window=settings.stop_window,
        stop_tolerance=settings.stop_tolerance,
        autocast_dtype=torch.bfloat16 if settings.precision == "bf16" else None, channels_last=channels_last)


@dataclass(frozen=True)
class DeviceConfig:
    """Everything decided from the device, made in one place (`resolve`), so a test can build what a
    CUDA run would use and run it on the CPU: only the device then differs."""

    settings: Settings  # precision resolved to fp32 or bf16, scales to a list: what the plan's recipe records
    optim: OptimConfig  # including bf16 autocast and channels_last
    cudnn_benchmark: bool  # applied on a CUDA device only (Engine.__init__)
    # L-BFGS's chunks replayed as CUDA graphs (optimize.GraphChunks): on for CUDA, where the host's kernel launches
    # left an H200 97% idle; never captured on another device, whatever this says (a test builds it on a CPU).
    cuda_graphs: bool = False
    # The most photos `batch: auto` puts in one batch (as memory allows, Engine.batch_size): a GPU fills up
    # with them; on a CPU a batch of 8 took as long as 8 one by one (benchmarks/lbfgs-results.md), so 1.
    auto_batch_max: int = 1


def resolve(settings: Settings, device_type: str, bf16_supported: bool = True) -> DeviceConfig:
    """The settings for a device type ('cuda', 'cpu', 'mps'). `bf16_supported` is the CUDA card's answer
    (torch.cuda.is_bf16_supported()); `precision: auto` means bf16 on CUDA when it says yes. `scales: auto`
    becomes the levels for `size` (pyramid.auto_scales), so the recipe records the levels actually run."""
    cuda = device_type == "cuda"
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda and bf16_supported)
    scales = auto_scales(settings.size) if settings.scales == "auto" else settings.scales
    resolved = settings.replace(precision="bf16" if bf16 else "fp32", scales=scales)
    # The same few shapes repeat for hundreds of steps: let cuDNN pick the fastest kernels once.
    return DeviceConfig(resolved, optim_config(resolved, channels_last=cuda), cudnn_benchmark=cuda, cuda_graphs=cuda,
                        auto_batch_max=AUTO_BATCH_MAX if cuda else 1)
