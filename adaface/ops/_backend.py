"""Which implementation an op runs: the PyTorch reference, the Triton kernels, or the C++/CUDA extension."""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import ModuleType

import torch

from adaface.kernels._runtime import interpreting

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

BUILD_HINT = (
    "The C++/CUDA extension `adaface._C` is not built. Build it with "
    "`pip install --no-build-isolation -e .` in an environment where torch is installed "
    "(a CUDA toolkit with nvcc gives the CUDA kernels, otherwise the CPU kernels are built); "
    "ADAFACE_BUILD_EXT=0 disables it on purpose."
)


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


# The ops this version of the package calls in `adaface._C` (an older build registers other names).
EXTENSION_OPS = ("delta_cosine_ext_fwd", "delta_cosine_ext_bwd", "soft_warp_ext_fwd", "soft_warp_ext_bwd")


def _probe_extension() -> tuple[ModuleType | None, str | None, bool]:
    """(module, import error, whether it is broken): not built is expected; a module that exists but fails to
    load (an ABI mismatch after a torch upgrade, a missing library) or is out of date (it lacks an op this
    package calls) is broken, and `auto` says so."""
    try:
        module = importlib.import_module("adaface._C")
        missing = [name for name in EXTENSION_OPS if not hasattr(torch.ops.adaface, name)]
        if missing:
            return None, f"out of date: it has no torch.ops.adaface.{missing[0]}", True
        return module, None, False
    except ModuleNotFoundError as exc:
        if exc.name == "adaface._C":
            return None, str(exc), False
        return None, f"{type(exc).__name__}: {exc}", True
    except (ImportError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}", True


# Probed once, at import: torch.compile then traces the dispatch below without reaching an import statement.
_EXTENSION, _EXTENSION_ERROR, _EXTENSION_BROKEN = _probe_extension()
_WARNED_BROKEN = False


def _warn_broken_extension() -> None:
    global _WARNED_BROKEN
    if not _WARNED_BROKEN:
        _WARNED_BROKEN = True
        warnings.warn(
            f"adaface._C failed to load ({_EXTENSION_ERROR}); backend='auto' falls back to the PyTorch reference. "
            "Rebuild it against the installed torch: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=3,
        )


def load_extension() -> ModuleType:
    """`adaface._C` (importing it registered `torch.ops.adaface.*`), or a RuntimeError with build instructions."""
    if _EXTENSION is None:
        raise RuntimeError(f"{BUILD_HINT} (import error: {_EXTENSION_ERROR})")
    return _EXTENSION


def extension_available() -> bool:
    return _EXTENSION is not None


def extension_has_cuda() -> bool:
    return _EXTENSION is not None and bool(getattr(_EXTENSION, "WITH_CUDA", False))


def resolve_backend(backend: str, device: torch.device, op: str, *, supports: tuple[str, ...]) -> str:
    """Turn the user's `backend` into the one that runs, with a clear error when it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in supports and triton_importable():
            return "triton"
        # The C++ losses are faster than the eager reference on CPU (bench/test_bench_cpp.py), and the soft
        # warp never builds the N x M matrix (masked rows cost nothing), so its workspace stays small.
        if device.type == "cpu" and "cpp" in supports:
            if _EXTENSION is not None:
                return "cpp"
            if _EXTENSION_BROKEN:
                _warn_broken_extension()
        return "torch"
    if backend not in supports:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (available: {supports})")
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError(f"{op}: backend='triton' needs the `triton` package")
        # meta tensors reach the custom ops' fakes: shapes and saved state without storage (memory estimates)
        if device.type not in ("cuda", "meta") and not interpreting():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing adaface to run the kernels on the CPU through Triton's interpreter"
            )
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got {device.type}; use 'cpp' for CPU")
        load_extension()
        if not extension_has_cuda():
            raise RuntimeError(f"{op}: `adaface._C` was built without CUDA kernels. {BUILD_HINT}")
    elif backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' needs CPU tensors, got {device.type}; use 'cuda'")
        load_extension()
    return backend
