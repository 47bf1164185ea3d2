"""expanded_attention benchmarks: the Triton kernels against the PyTorch alternatives, forward and forward+backward.

Variants (each benchmark's group is "<mode> E=<E> <pass>"; the baseline of a group is `eager`):
- eager:     `expanded_attention_reference` (materialises the [B, H, L, E, S] logits), fp32 compute off
             (`upcast=False`, the inputs' dtype, as a model would run it);
- compiled:  `torch.compile` of that reference;
- sdpa:      `adaface.testing.attention_inputs.sdpa_composition`: one scaled_dot_product_attention over the E·S
             slots (k/v copies concatenated along the keys; for an expanded q, the block-diagonal key trick,
             E× the QKᵀ work — see its docstring). At E = 1 it is plain SDPA (is_causal);
- triton:    `expanded_attention(backend="triton")`;
- xformers:  xformers.ops.memory_efficient_attention at E = 1 only (where xformers is installed);
- eager_e1:  the eager reference at E = 1 on the same batch, in the E > 1 groups: the target is that the
             Triton kernel at E = 8 is no slower than this.
CUDA: the Prompt Inverter's shapes (CLIP-L text: B = 4, H = 12, L = S = 77, D = 64, causal), fp16, inputs in a
projection's [B, L, H, E, D] layout permuted (non-contiguous), E in {1, 4, 8, 16} for the paper's multi-Q/V
and E = 8 for the reference code's multi-K/V. CPU: a tiny shape only, because the Triton variant runs through
the interpreter there (its CPU time measures the interpreter, not the kernel); `compiled` on the CPU runs at
one configuration only (Inductor's C++ compile of each graph takes tens of seconds there).
Recorded with every figure: device, flops (useful matmul flops, `attention_flops`), peak_bytes (peak memory
above the inputs), shape, dtype.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adaface.ops import expanded_attention, expanded_attention_reference
from adaface.testing.attention_inputs import as_views, attention_flops, make_leaves, sdpa_composition
from adaface.testing.benchmarking import peak_memory_bytes, record, synchronize

CUDA = torch.cuda.is_available()
if CUDA:
    B, H, L, D, DTYPE = 4, 12, 77, 64, torch.float16
    CONFIGS = [("none", 1), ("qv", 4), ("qv", 8), ("qv", 16), ("kv", 8)]
    COMPILED_AT = {("none", 1), ("qv", 8), ("kv", 8)}
else:
    B, H, L, D, DTYPE = 1, 2, 16, 32, torch.float32
    CONFIGS = [("none", 1), ("qv", 4), ("kv", 4)]
    COMPILED_AT = {("qv", 4)}
CAUSAL = True
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
VARIANTS = ["eager", "compiled", "sdpa", "triton", "xformers", "eager_e1"]


def _make(mode, E, device):
    leaves = make_leaves(B, H, L, L, D, E, mode, dtype=DTYPE, device=device, layout="proj", seed=0)
    return as_views(leaves, "proj", E), leaves


def _runner(variant, mode, E):
    if variant == "eager":
        return lambda q, k, v: expanded_attention_reference(q, k, v, causal=CAUSAL, upcast=False)
    if variant == "compiled":
        fn = torch.compile(lambda q, k, v: expanded_attention_reference(q, k, v, causal=CAUSAL, upcast=False))
        return fn
    if variant == "sdpa":
        return lambda q, k, v: sdpa_composition(q, k, v, causal=CAUSAL)
    if variant == "triton":
        return lambda q, k, v: expanded_attention(q, k, v, causal=CAUSAL, backend="triton")
    if variant == "xformers":
        import xformers.ops as xops

        def run(q, k, v):  # xformers layout [B, M, H, K]
            qx, kx, vx = (t[:, :, :, 0].transpose(1, 2) for t in (q, k, v))
            out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=xops.LowerTriangularMask())
            return out.transpose(1, 2)

        return run
    raise AssertionError(variant)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("mode, E", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_expanded_attention(benchmark, device, variant, mode, E, pass_):
    if variant == "xformers" and not HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    if variant == "xformers" and E != 1:
        pytest.skip("xformers: plain attention (E = 1) only")
    if variant == "eager_e1" and E == 1:
        pytest.skip("eager_e1 is the E = 1 comparison row of the E > 1 groups (the E = 1 group has `eager`)")
    if variant == "compiled" and (mode, E) not in COMPILED_AT:
        pytest.skip(f"torch.compile benchmarked at {sorted(COMPILED_AT)} only (compile time)")
    run_mode, run_e = ("none", 1) if variant == "eager_e1" else (mode, E)
    (q, k, v), leaves = _make(run_mode, run_e, device)
    fn = _runner("eager" if variant == "eager_e1" else variant, run_mode, run_e)
    g = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=DTYPE)

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            torch.autograd.grad(fn(q, k, v), leaves, g)
        synchronize(device)

    step()  # compile / JIT outside the timed region
    peak = peak_memory_bytes(step, device)
    benchmark.group = f"expanded_attention {mode} E={E} {pass_}"
    benchmark(step)
    record(
        benchmark, device,
        flops=attention_flops(B, H, L, L, D, run_e, CAUSAL, backward=pass_ == "fwdbwd"),
        peak_bytes=peak, baseline=variant == "eager", shape=f"B={B} H={H} L=S={L} D={D} E={run_e} {run_mode}",
        dtype=str(DTYPE).replace("torch.", ""), causal=CAUSAL,
        interpreted=variant == "triton" and device.type != "cuda",
    )
