"""adaface.testing.benchmarking.peak_memory_bytes on the CPU (torch profiler memory records).

The case that matters: an op whose temporaries are allocated by child ops and freed inside it (a custom op,
or the C++ extension's scratch). The op's own record then carries a net negative figure; it must count at the
op's end, after the children's allocations, or the peak comes out as little as the op's output.
"""

from __future__ import annotations

import torch

from adaface.testing.benchmarking import peak_memory_bytes

MIB = 1 << 20
CPU = torch.device("cpu")


@torch.library.custom_op("adaface_test::sum_with_temporary", mutates_args=())
def _sum_with_temporary(x: torch.Tensor, temp_floats: int) -> torch.Tensor:
    tmp = torch.ones(temp_floats)  # freed before the op returns
    return x + tmp.sum()


@_sum_with_temporary.register_fake
def _(x, temp_floats):
    return torch.empty_like(x)


def test_peak_of_a_returned_allocation():
    peak = peak_memory_bytes(lambda: torch.empty(MIB), CPU)  # 4 MiB of fp32, alive at the end
    assert 4 * MIB <= peak < 4 * MIB + 64 * 1024


def test_freed_temporary_then_smaller_allocation():
    def fn():
        tmp = torch.ones(MIB)  # 4 MiB
        del tmp
        return torch.ones(MIB // 4)  # 1 MiB

    peak = peak_memory_bytes(fn, CPU)
    assert 4 * MIB <= peak < 5 * MIB


def test_temporaries_freed_inside_an_op_count():
    x = torch.zeros(4)
    peak = peak_memory_bytes(lambda: _sum_with_temporary(x, 2 * MIB), CPU)  # an 8 MiB temporary inside the op
    assert peak >= 8 * MIB
