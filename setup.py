"""Build hook for the optional C++/CUDA extension `adaface._C` (sources in csrc/).

Metadata and dependencies live in pyproject.toml. This file only decides whether, and how, to compile
csrc/: a CUDA extension when torch has CUDA and a working toolkit is found, a CPU-only C++ extension
otherwise, nothing at all with ADAFACE_BUILD_EXT=0. A failed compile never fails the install: the
Triton and PyTorch backends work without the extension, and asking for the missing backend at run time
raises an error that says how to build it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "86", "89", "90")


def _log(msg: str) -> None:
    print(f"[adaface setup] {msg}", file=sys.stderr)


def _is_toolkit_root(path: str | None) -> bool:
    if not path:
        return False
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    has_headers = os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    has_libs = any(
        glob.glob(os.path.join(path, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/*/lib")
    )
    return has_nvcc and has_headers and has_libs


def find_cuda_home() -> str | None:
    """The real toolkit root (bin/nvcc, include/, lib64/).

    The `nvcc` on PATH can be a wrapper script outside the toolkit, from which torch guesses a wrong root
    and the link then fails on -lcudart, so candidates are checked for all three parts.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, errors="ignore") as fh:
                head = fh.read(4096)
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for cand in candidates:
        if _is_toolkit_root(cand):
            return os.path.realpath(cand)
    return None


def build_extensions() -> tuple[list, dict]:
    if os.environ.get("ADAFACE_BUILD_EXT", "1") == "0":
        _log("ADAFACE_BUILD_EXT=0: skipping the C++/CUDA extension")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable in the build environment (use --no-build-isolation): no extension")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpu_sources:
        return [], {}
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cuda_home is not None
        and os.environ.get("ADAFACE_BUILD_CUDA", "1") != "0"
    )
    cxx_flags = ["-O3", "-std=c++20"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only forks when the including file is compiled with OpenMP (ATen/ParallelOpenMP.h);
        # libgomp.so.1 is the runtime torch itself loads.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[0]}.{a[1]}" for a in CUDA_ARCHS))
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "adaface._C",
            cpu_sources + cuda_sources,
            define_macros=[("ADAFACE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
        _log(f"building the CUDA extension (toolkit {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension(
            "adaface._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
        _log("building the CPU-only C++ extension")

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class TolerantBuildExtension(base):
        """A compile error leaves the package usable without `adaface._C` instead of failing pip."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any toolchain failure is reported, not fatal
                if os.environ.get("ADAFACE_REQUIRE_EXT") == "1":
                    raise
                _log(f"extension build FAILED ({exc!r}); the Triton and PyTorch backends still work")

    return [ext], {"build_ext": TolerantBuildExtension}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
