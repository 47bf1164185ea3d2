"""Test harness: Triton kernels run on the CPU through the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any module that defines a Triton kernel is imported, so it is set
here, at the top of the root conftest, before test modules are collected.
"""

from __future__ import annotations

from adaface.testing.device import configure_triton_interpreter

DEVICE = configure_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run: CI must not find a new input on a random day.
settings.register_profile("adaface", derandomize=True, deadline=None)
settings.load_profile("adaface")

HAS_CUDA = DEVICE.type == "cuda"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else the CPU (kernels then run under TRITON_INTERPRET=1)."""
    return DEVICE


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random SD-1.5 pipeline saved in the released folder layout (built once per session)."""
    from adaface.testing.tiny_models import save_tiny_sd15  # imports diffusers: only for the tests that use it

    return save_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))
