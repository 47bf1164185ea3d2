"""Where kernels run in tests and benchmarks: CUDA when present, else the CPU under Triton's interpreter."""

from __future__ import annotations

import os

import torch


def configure_triton_interpreter() -> torch.device:
    """Set TRITON_INTERPRET=1 when there is no CUDA device; call before any kernel module is imported."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """A human-readable name of the device a figure was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores, torch {torch.__version__})"


def extension_built() -> bool:
    """Whether adaface._C (the C++ kernels: backend "cpp") is built and loads."""
    from adaface.ops import _backend

    return _backend.extension_available()


def extension_runs_cuda() -> bool:
    """Whether adaface._C was built with its CUDA kernels (backend "cuda") and a CUDA device is here to run them."""
    from adaface.ops import _backend

    return _backend.extension_has_cuda() and torch.cuda.is_available()
