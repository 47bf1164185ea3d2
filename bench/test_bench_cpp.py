"""C++/CUDA extension benchmarks: the losses' "cpp" (CPU) and "cuda" backends vs the eager PyTorch reference.

CPU: soft warp fwd and fwd+bwd at B=2, N=M=1024, Dq=C=320, fp32, no mask; delta cosine fwd+bwd on four
[4, 4096, 320] fp32 tensors (nearly parallel, as in training). Eager and cpp run in the same session; the cpp
row records `x_eager` (eager median / cpp median) and `peak_vs_eager` (cpp peak / eager peak, both from
adaface.testing.benchmarking.peak_memory_bytes) when the eager row of its group ran first. The soft-warp
groups also time `eager_matmuls_only`: the eager reference's six matrix products alone (the floor of its
time on this BLAS), and record `returned_bytes` (the input gradients, part of every row's peak).
CUDA (gpu-marked, skipped without a GPU): the paper's shapes in bf16, cuda vs triton vs eager.
Every row records the device, dtype, shape, peak memory and GB/s (delta cosine) or TFLOP/s (soft warp).
Ratios for all rows: `python bench/summarize.py <json>` (against the row marked baseline = eager).
"""

from __future__ import annotations

import functools

import pytest
import torch

from adaface.ops import (
    delta_cosine_loss,
    delta_cosine_loss_reference,
    soft_warp_loss,
    soft_warp_loss_reference,
)
from adaface.testing.benchmarking import loss_step, peak_memory_bytes, record
from adaface.testing.delta_cosine_inputs import bytes_moved, cuda_inputs, delta_cosine_inputs
from adaface.testing.device import extension_built, extension_runs_cuda
from adaface.testing.soft_warp_inputs import make_inputs, make_mask, soft_warp_flops

_EAGER: dict[str, tuple[float, int]] = {}  # group → (median seconds, peak bytes) of its eager row

CPU_WARP = (2, 1024, 1024, 320, 320)
CPU_DELTA = (4, 4096, 320)
CUDA_WARP = [("64x64map_320ch", (4, 4096, 4096, 320, 320), "none", 1.0),
             ("64x64map_320ch_face35", (4, 4096, 4096, 320, 320), "bool", 0.35),
             ("8x8map_1280ch", (4, 64, 64, 1280, 1280), "none", 1.0)]
CUDA_DELTA = [("per_token_4x4096x1280", (4, 4096, 1280)), ("per_token_4x4096x320", (4, 4096, 320))]


def _time_and_record(benchmark, device, group, variant, run, rounds, **extra):
    run()  # warm-up
    peak = peak_memory_bytes(run, device)
    benchmark.group = group
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    if variant == "eager":
        _EAGER[group] = (median, peak)
    elif group in _EAGER:
        base_t, base_peak = _EAGER[group]
        extra["x_eager"] = base_t / median
        extra["peak_vs_eager"] = peak / base_peak if base_peak else None
    record(benchmark, device, variant=variant, peak_bytes=peak, baseline=variant == "eager", **extra)
    return median


def _loss_fn(variant, reference, op):
    """The eager reference, or the op on backend `variant`."""
    return reference if variant == "eager" else functools.partial(op, backend=variant)


def _skip_unavailable(variant, device):
    if device.type != "cuda" and variant != "cpp" and variant != "eager_cpu":
        pytest.skip("CUDA benchmark: needs a CUDA device")
    if variant == "cpp" and not extension_built():
        pytest.skip("adaface._C is not built")
    if variant == "cuda" and not extension_runs_cuda():
        pytest.skip("adaface._C is not built with CUDA")
    if variant in ("cuda", "triton") and device.type != "cuda":
        pytest.skip(f"{variant} needs a CUDA device here")


# ---------------------------------------------------------------------------------------------------------
# CPU


def _eager_matmuls(ins, backward):
    """Only the batched matrix products of the eager reference (2 forward, 4 more backward), same shapes:
    what the eager time cannot go below on the CPU's BLAS."""
    q, k, f, v = (t.detach() for t in ins)
    s = torch.bmm(q, k.transpose(1, 2))
    w = torch.bmm(s, v)
    if not backward:
        return w
    dp = torch.bmm(f, v.transpose(1, 2))  # dW·Vᵀ
    return w, dp, torch.bmm(s.transpose(1, 2), f), torch.bmm(dp, k), torch.bmm(dp.transpose(1, 2), q)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", ["eager", "cpp", "eager_matmuls_only"])
def test_bench_cpu_soft_warp(benchmark, variant, backward):
    _skip_unavailable("cpp" if variant == "cpp" else "eager_cpu", torch.device("cpu"))
    device = torch.device("cpu")
    B, N, M, Dq, C = CPU_WARP
    ins = [t.requires_grad_(backward) for t in make_inputs(B, N, M, Dq, C, seed=0)]

    def run():
        if variant == "eager_matmuls_only":
            return _eager_matmuls(ins, backward)
        out = _loss_fn(variant, soft_warp_loss_reference, soft_warp_loss)(*ins)
        return torch.autograd.grad(out, ins) if backward else out

    flops = soft_warp_flops(B, N, M, Dq, C, backward=backward)
    group = f"cpu soft_warp B2 N=M=1024 Dq=C=320 {'fwd+bwd' if backward else 'fwd'}"
    # returned_bytes: the four fp32 input gradients every variant must allocate (part of peak_bytes)
    median = _time_and_record(benchmark, device, group, variant, run, rounds=5, dtype="float32",
                              shape=f"B{B} N{N} M{M} Dq{Dq} C{C}", flops=flops, threads=torch.get_num_threads(),
                              returned_bytes=sum(t.numel() * 4 for t in ins) if backward else 0)
    benchmark.extra_info["tflops"] = flops / median / 1e12


@pytest.mark.parametrize("variant", ["eager", "cpp"])
def test_bench_cpu_delta_cosine_fwd_bwd(benchmark, variant):
    _skip_unavailable("eager_cpu" if variant == "eager" else variant, torch.device("cpu"))
    device = torch.device("cpu")
    xs = delta_cosine_inputs(CPU_DELTA, seed=0, parallel=1e-2, requires_grad=True)

    fn = _loss_fn(variant, delta_cosine_loss_reference, delta_cosine_loss)

    def run():
        return torch.autograd.grad(fn(*xs), xs)

    moved = bytes_moved(CPU_DELTA, torch.float32, backward=True)
    median = _time_and_record(benchmark, device, "cpu delta_cosine 4x[4,4096,320] fwd+bwd", variant, run, rounds=5,
                              dtype="float32", shape=str(CPU_DELTA), bytes_moved=moved,
                              threads=torch.get_num_threads())
    benchmark.extra_info["gbps"] = moved / median / 1e9


# ---------------------------------------------------------------------------------------------------------
# CUDA: cuda vs triton vs eager


def _cuda_rows(test):
    """The CUDA rows of a test: gpu-marked, forward and forward+backward, eager vs triton vs cuda."""
    test = pytest.mark.parametrize("variant", ["eager", "triton", "cuda"])(test)
    test = pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])(test)
    return pytest.mark.gpu(test)


@_cuda_rows
@pytest.mark.parametrize("case", range(len(CUDA_WARP)), ids=[c[0] for c in CUDA_WARP])
def test_bench_cuda_soft_warp(benchmark, device, case, variant, backward):
    _skip_unavailable(variant, device)
    name, (B, N, M, Dq, C), mask_kind, p = CUDA_WARP[case]
    x = make_inputs(B, N, M, Dq, C, dtype=torch.bfloat16, device=device, seed=0)
    mask = make_mask(mask_kind, B, N, device, torch.Generator().manual_seed(1), p=p)
    ins = [t.clone().requires_grad_(backward) for t in x]

    fn = _loss_fn(variant, soft_warp_loss_reference, soft_warp_loss)
    run = loss_step(lambda: fn(*ins, mask), ins if backward else None, device)
    rows = B * N if mask is None else int(mask.sum().item())
    flops = soft_warp_flops(1, rows, M, Dq, C, backward)
    median = _time_and_record(benchmark, device, f"cuda soft_warp {name} {'fwd+bwd' if backward else 'fwd'}",
                              variant, run, rounds=10, dtype="bfloat16", shape=f"B{B} N{N} M{M} Dq{Dq} C{C}",
                              mask=f"{mask_kind} p={p}", flops=flops)
    benchmark.extra_info["tflops"] = flops / median / 1e12


@_cuda_rows
@pytest.mark.parametrize("case", range(len(CUDA_DELTA)), ids=[c[0] for c in CUDA_DELTA])
def test_bench_cuda_delta_cosine(benchmark, device, case, variant, backward):
    _skip_unavailable(variant, device)
    name, shape = CUDA_DELTA[case]
    xs = cuda_inputs(shape, dtype=torch.bfloat16, device=device, requires_grad=backward)

    fn = _loss_fn(variant, delta_cosine_loss_reference, delta_cosine_loss)
    run = loss_step(lambda: fn(*xs), xs if backward else None, device)
    moved = bytes_moved(shape, torch.bfloat16, backward=backward)
    median = _time_and_record(benchmark, device, f"cuda delta_cosine {name} {'fwd+bwd' if backward else 'fwd'}",
                              variant, run, rounds=20, dtype="bfloat16", shape=str(shape), bytes_moved=moved)
    benchmark.extra_info["gbps"] = moved / median / 1e9
