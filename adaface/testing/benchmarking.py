"""Shared benchmark plumbing: peak memory on CUDA and CPU, and the figures recorded with every result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .device import device_name


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch while `fn()` runs, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: torch's profiler memory records: each op's *self*
    allocations (its children's are their own records, so nothing is counted twice) and the `[memory]`
    records of frees; the running sum's maximum is the peak. An op's self figure is net (what it allocated
    minus what it freed of its children's, e.g. the scratch of a C++ op): a gain is placed at the op's start
    and a loss at its end, so the frees of an op's temporaries never come before their allocations.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        d = e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start if d > 0 else e.time_range.end, d))
    deltas.sort()
    current = peak = 0
    for _, d in deltas:
        current += d
        peak = max(peak, current)
    return peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_step(
    loss: Callable[[], torch.Tensor], grad_of: Sequence[torch.Tensor] | None, device: torch.device
) -> Callable[[], torch.Tensor]:
    """What a loss benchmark times: `loss()`, its gradients w.r.t. `grad_of` (forward only when None), and a
    device sync, so that the time covers the kernels; returns the loss."""

    def run() -> torch.Tensor:
        out = loss()
        if grad_of is not None:
            torch.autograd.grad(out, grad_of)
        synchronize(device)
        return out

    return run


def record(benchmark: Any, device: torch.device, **extra: Any) -> None:
    """Attach the device and any figures (bytes moved, flops, peak memory) to a pytest-benchmark result."""
    benchmark.extra_info["device"] = device_name(device)
    benchmark.extra_info.update(extra)
