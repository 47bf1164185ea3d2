"""delta_cosine_loss benchmarks: Triton kernels vs the eager reference and torch.compile of it.

CUDA (paper scale, SD-1.5 at 512²):
    per-token rows, 64² map, 1280 ch: 4 × [4, 4096, 1280]  (fp32: 335 MB of input; also bf16)
    per-token rows, 64² map,  320 ch: 4 × [4, 4096, 320]
    whole flattened 64²×320 maps as rows: 4 × [4, 1310720]  (the split path)
CPU (without a GPU): small shapes; the Triton kernels run under the interpreter (Python per program), so only
the tiny shapes run them. Forward, and forward + backward with the subject side requiring grad (the class
side is the teacher and is detached, as in training). Every result records the device, dtype, the bytes the
fused op must move at least (`bytes`: forward reads the four inputs and writes one fp32 per row; the backward
reads the four inputs again and writes two gradients; summarize.py turns it into GB/s for every variant),
and peak memory (`peak_bytes`). Ratios: `python bench/summarize.py <json>` against the eager row.
"""

from __future__ import annotations

import pytest
import torch

from adaface.ops import delta_cosine_loss, delta_cosine_loss_reference
from adaface.testing.benchmarking import loss_step, peak_memory_bytes, record
from adaface.testing.delta_cosine_inputs import (
    LONG_ROW_CUDA,
    PER_TOKEN_CUDA,
    PER_TOKEN_SMALL_C_CUDA,
    bytes_moved,
    cuda_inputs,
    delta_cosine_inputs,
)

CUDA_CASES = [  # id, shape, dtype
    ("per_token_4x4096x1280_fp32", PER_TOKEN_CUDA, torch.float32),
    ("per_token_4x4096x1280_bf16", PER_TOKEN_CUDA, torch.bfloat16),
    ("per_token_4x4096x320_fp32", PER_TOKEN_SMALL_C_CUDA, torch.float32),
    ("long_row_4x1310720_fp32", LONG_ROW_CUDA, torch.float32),
]
CPU_CASES = [
    ("cpu_tiny_2x16x33", (2, 16, 33), torch.float32),
    ("cpu_tiny_long_row_2x5000", (2, 5000), torch.float32),  # 2 chunks per row: the split path
    ("cpu_small_8x64x320", (8, 64, 320), torch.float32),
    ("cpu_small_long_row_2x81920", (2, 81920), torch.float32),
]
TRITON_CPU_MAX_ELEMS = 16 * 1024  # per input; the interpreter runs each program in Python
GRAD_MASK = (True, True, False, False)  # subject side requires grad, class side detached

_COMPILED = {}


def _compiled_reference():
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(delta_cosine_loss_reference)
    return _COMPILED["ref"]


VARIANTS = ("eager", "compile", "triton")


def _loss_fn(variant: str):
    if variant == "eager":
        return delta_cosine_loss_reference
    if variant == "compile":
        return _compiled_reference()
    return lambda *a: delta_cosine_loss(*a, backend="triton")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", range(4))
def test_bench_delta_cosine(benchmark, device, case, variant, backward):
    cases = CUDA_CASES if device.type == "cuda" else CPU_CASES
    name, shape, dtype = cases[case]
    numel = 1
    for s in shape:
        numel *= s
    if variant == "triton" and device.type != "cuda" and numel > TRITON_CPU_MAX_ELEMS:
        pytest.skip("Triton runs interpreted on CPU (Python per program): only the tiny CPU shapes run it")
    if device.type == "cuda":
        xs = cuda_inputs(shape, dtype=dtype, device=device, seed=0, parallel=1e-2)
    else:
        xs = delta_cosine_inputs(shape, dtype=dtype, device=device, seed=0, parallel=1e-2)
    ins = [x.detach().clone().requires_grad_(backward and g) for x, g in zip(xs, GRAD_MASK)]
    live = [t for t in ins if t.requires_grad]
    fn = _loss_fn(variant)

    run = loss_step(lambda: fn(*ins), live if backward else None, device)
    run()  # warm-up: compiles / JIT outside the timing
    peak = peak_memory_bytes(run, device)
    moved = bytes_moved(shape, dtype, backward=backward, n_grads=len(live))
    benchmark.group = f"delta_cosine {name} {'fwd+bwd' if backward else 'fwd'}"
    slow_cpu = device.type != "cuda" and variant == "triton"
    benchmark.pedantic(run, rounds=3 if slow_cpu else 10, warmup_rounds=0 if slow_cpu else 2, iterations=1)
    median = benchmark.stats.stats.median
    record(
        benchmark, device, dtype=str(dtype).replace("torch.", ""), shape="x".join(map(str, shape)),
        grads="subj_single, subj_comp" if backward else "none", bytes=moved, gbps=moved / median / 1e9,
        peak_bytes=peak, baseline=variant == "eager", interpreted=slow_cpu,
    )
