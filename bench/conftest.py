"""Benchmark harness: the same device rule as the tests (the interpreter on a CPU-only machine)."""

from __future__ import annotations

from adaface.testing.device import configure_triton_interpreter

DEVICE = configure_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
