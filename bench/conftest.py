"""Benchmark harness: the same device rule as the tests (the interpreter on a CPU-only machine); the results go
to runs/bench.json unless --benchmark-json names another file (`python bench/summarize.py` reads it)."""

from __future__ import annotations

from pathlib import Path

from adaface.testing.device import configure_triton_interpreter

DEVICE = configure_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "runs" / "bench.json"


def pytest_configure(config: pytest.Config) -> None:
    # before pytest-benchmark's own pytest_configure (trylast), which reads the option
    if config.getoption("benchmark_json", None) is None and not config.getoption("benchmark_disable", False):
        DEFAULT_JSON.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = DEFAULT_JSON


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
