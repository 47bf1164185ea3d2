"""soft_warp_loss benchmarks: Triton kernels vs the eager reference, torch.compile of it, and SDPA + cosine.

CUDA: the paper's shapes, bf16 inputs (the eager reference upcasts to fp32, as written; the SDPA composition and
the kernels run in bf16 with fp32 accumulation) and fp32 inputs, the training path (stage 2 hands the loss
fp32 after its norms; the kernels run at precision "auto": TF32 where torch allows it, else the autocast dtype,
recorded as `precision`):
    64² map: B=4, N=M=4096, Dq=C=320        (mask: none, and a random 35 % "face" mask)
     8² map: B=4, N=M=64,   Dq=C=1280
CPU (no GPU): small shapes; the Triton kernels run under the interpreter there, so only a tiny shape runs them.
Every result records the device, dtype, useful TFLOP/s (`flops`, counted on the selected rows), peak memory
(`peak_bytes`, adaface.testing.benchmarking.peak_memory_bytes) and, for SDPA, the backend PyTorch picked.
Ratios: `python bench/summarize.py <json>` against the row marked baseline (eager) in the same group and run.
"""

from __future__ import annotations

import pytest
import torch

from adaface.ops import soft_warp_loss, soft_warp_loss_reference
from adaface.ops.soft_warp import resolve_precision
from adaface.testing.benchmarking import loss_step, peak_memory_bytes, record
from adaface.testing.soft_warp_inputs import make_inputs, make_mask, sdpa_soft_warp_loss, soft_warp_flops

CUDA_CASES = [  # id, (B, N, M, Dq, C), mask kind, mask keep-probability
    ("64x64map_320ch_nomask", (4, 4096, 4096, 320, 320), "none", 1.0),
    ("64x64map_320ch_face35", (4, 4096, 4096, 320, 320), "bool", 0.35),
    ("8x8map_1280ch_nomask", (4, 64, 64, 1280, 1280), "none", 1.0),
]
CPU_CASES = [
    ("cpu_tiny_24x24_d24", (1, 24, 24, 24, 24), "bool", 0.5),
    ("cpu_small_256x256_d64", (2, 256, 256, 64, 64), "bool", 0.5),
]
TRITON_CPU_MAX_ELEMS = 24 * 24  # N·M: the interpreter runs each program in Python


def _cases(device: torch.device):
    return CUDA_CASES if device.type == "cuda" else CPU_CASES


def _sdpa_backend(q, k, v) -> str:
    """The SDPA backend PyTorch's dispatcher picks for [1, 1, L, D] inputs (flash needs equal q/v head dims
    ≤ 256; memory-efficient / cuDNN have their own limits; otherwise the math backend materialises N×M)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q[None, None], k[None, None], v[None, None], None, 0.0, False, scale=1.0)
        return SDPBackend(choice).name
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({type(exc).__name__})"


_COMPILED = {}


def _compiled_reference():
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(soft_warp_loss_reference)
    return _COMPILED["ref"]


VARIANTS = ("eager", "compile", "sdpa", "triton")


def _loss_fn(variant: str):
    if variant == "eager":
        return soft_warp_loss_reference
    if variant == "compile":
        return _compiled_reference()
    if variant == "sdpa":
        return sdpa_soft_warp_loss
    return lambda *a: soft_warp_loss(*a, backend="triton")


@pytest.mark.parametrize("input_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", range(3))
def test_bench_soft_warp(benchmark, device, case, variant, backward, input_dtype):
    cases = _cases(device)
    if case >= len(cases):
        pytest.skip("no such case on this device")
    if device.type != "cuda" and input_dtype != "fp32":
        pytest.skip("the CPU rows use fp32 inputs")
    name, (B, N, M, Dq, C), mask_kind, p = cases[case]
    if variant == "triton" and device.type != "cuda" and N * M > TRITON_CPU_MAX_ELEMS:
        pytest.skip("Triton runs interpreted on CPU (Python per program): only the tiny CPU shape runs it")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[input_dtype]
    x = make_inputs(B, N, M, Dq, C, dtype=dtype, device=device, seed=0)
    mask = make_mask(mask_kind, B, N, device, torch.Generator().manual_seed(1), p=p)
    ins = [t.clone().requires_grad_(backward) for t in x]
    fn = _loss_fn(variant)

    run = loss_step(lambda: fn(*ins, mask), ins if backward else None, device)
    run()  # warm-up: compiles / autotunes outside the timing
    peak = peak_memory_bytes(run, device)
    rows = N * B if mask is None else int(mask.sum().item())
    flops = soft_warp_flops(1, rows, M, Dq, C, backward)
    extra = {"dtype": str(dtype).replace("torch.", ""), "shape": f"B{B} N{N} M{M} Dq{Dq} C{C}",
             "mask": f"{mask_kind} p={p}", "selected_rows": rows, "flops": flops, "peak_bytes": peak,
             "baseline": variant == "eager", "interpreted": variant == "triton" and device.type != "cuda",
             "variant": variant}
    if variant == "triton":
        extra["precision"] = resolve_precision("auto", dtype, device)
    if variant == "sdpa":
        sel = slice(None) if mask is None else mask[0]
        extra["sdpa_backend"] = _sdpa_backend(x[0][0][sel], x[1][0], x[3][0])
    benchmark.group = f"soft_warp {name} {input_dtype} {'fwd+bwd' if backward else 'fwd'}"
    slow_cpu = device.type != "cuda" and variant == "triton"
    benchmark.pedantic(run, rounds=3 if slow_cpu else 10, warmup_rounds=0 if slow_cpu else 2, iterations=1)
    extra["tflops"] = flops / benchmark.stats.stats.median / 1e12
    record(benchmark, device, **extra)
