"""Every CUDA launch configuration of the Triton kernels runs once: under the interpreter here, natively on a GPU.

tests/triton_compile_check.py's `table()` lists every distinct configuration (kernel, argument types,
constexprs, warps, stages) the ops launch on CUDA at the GPU tests' and benchmarks' shapes, and compiles it.
Here each configuration is *executed*: the launchers choose exactly what they choose on CUDA
(`cuda_choices`), on shapes just past one tile in every dimension the configuration allows (so every tail,
every key/row block and every output chunk boundary is crossed), forward and backward against the op's
reference, in fp32 and fp16. A bf16 configuration has the tiles and flags of its fp16 twin (bf16 itself stays
on the GPU: the interpreter's bf16 tl.dot is wrong), so it counts as executed by the fp16 case.
`test_every_configuration_is_executed` fails when the table holds a configuration no case launches: a new
configuration cannot be added without being run.

Tolerances (adaface.testing.tolerances): fp32 atol 1e-5 / rtol 1e-4; fp16 at most 2× PyTorch's own error in
fp16 (the reference with upcast=False) plus a 4-ulp floor; the two losses are fp32 for every input dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaface.ops import (
    delta_cosine_loss,
    delta_cosine_loss_reference,
    expanded_attention,
    expanded_attention_reference,
    ortho_subtract,
    ortho_subtract_reference,
    soft_warp_loss,
    soft_warp_loss_reference,
)
from adaface.testing.attention_inputs import as_views, make_leaves
from adaface.testing.delta_cosine_inputs import delta_cosine_inputs
from adaface.testing.grads import input_grads
from adaface.testing.scripts import load_script
from adaface.testing.soft_warp_inputs import make_inputs, make_mask
from adaface.testing.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("q_subj", "q_comp", "feat_subj", "feat_comp")
DTYPES = (torch.float32, torch.float16)
CPU = torch.device("cpu")


def _compile_check():
    return load_script(ROOT / "tests" / "triton_compile_check.py")


CHECK = _compile_check()

# One case per distinct configuration (the shape picks the tiles: see each kernel module's `gpu_tiles`).
ATTENTION = [  # D (BLOCK_D 64: D = 40 masked; 128), mode, causal; L = S = 65: two 64 (fp32 D=128: three 32) tiles
    (D, mode, causal) for D in (40, 128) for mode in ("none", "qv", "kv", "qkv") for causal in (True, False)
]
DELTA = [  # (rows, C): rows-per-program tile 2, 4, 8, 16, 32, and the split path (17 chunks of 4096, combined 16 at
    # a time); C = 640 and 128 are stage 2's 32² attention outputs and its attention maps (8 heads x 16 slots)
    (3, 1280), (5, 640), (9, 320), (15, 21), (33, 128), (2, 16 * 4096 + 1),
]
SOFT_WARP = [  # (B, N, M, Dq, C): 64-row/column tiles crossed; Dq = C = 320: one program's two pieces, 256 + 64;
    # Dq = 640, C = 1280: the forward's streamed q and 640-wide output chunks (SD-1.5's 32² and 16² layers),
    # past its 32-row and 16- or 32-key blocks
    (2, 65, 65, 320, 320), (2, 65, 65, 40, 24), (1, 33, 33, 640, 1280),
]
ORTHO = [(2, 3, 768), (3, 5, 33)]  # BLOCK 1024 and 64, each with a masked tail


def _attention(D, mode, causal, dtype, device=CPU):
    B, H, L, E = 2, 1, 65, 2
    leaves = make_leaves(B, H, L, L, D, E, mode, dtype=dtype, device=device, layout="proj", seed=D + len(mode))
    out = expanded_attention(*as_views(leaves, "proj", E), causal=causal, backend="triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    return out, torch.autograd.grad(out, leaves, g), leaves, g


def _check_attention(D, mode, causal, dtype, device):
    out, grads, leaves, g = _attention(D, mode, causal, dtype, device)
    r32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = expanded_attention_reference(*as_views(r32, "proj", 2), causal=causal)
    ref_grads = torch.autograd.grad(ref, r32, g.float())
    lp_out, lp_grads = None, (None,) * 3
    if dtype != torch.float32:
        lp = [t.detach().clone().requires_grad_() for t in leaves]
        lp_out = expanded_attention_reference(*as_views(lp, "proj", 2), causal=causal, upcast=False)
        lp_grads = torch.autograd.grad(lp_out, lp, g)
    assert_close(out, ref, lp_out, name="out")
    for name, got, want, low in zip(("dq", "dk", "dv"), grads, ref_grads, lp_grads):
        assert_close(got, want, low, name=name)


def _delta(rows, C, dtype, device=CPU):
    xs = delta_cosine_inputs((rows, C), dtype=dtype, device=device, seed=rows, requires_grad=(True, True, False, False))
    out = delta_cosine_loss(*xs, reduction="none", backend="triton")
    return out, input_grads(out, xs, torch.linspace(0.5, 1.5, rows, device=device)), xs


def _check_delta(rows, C, dtype, device):
    out, grads, xs = _delta(rows, C, dtype, device)
    weight = torch.linspace(0.5, 1.5, rows, device=device)
    r32 = [x.detach().float().requires_grad_(x.requires_grad) for x in xs]
    ref = delta_cosine_loss_reference(*r32, reduction="none")
    ref_grads = input_grads(ref, r32, weight)
    lp_grads = [None] * 4
    if dtype != torch.float32:
        lp = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
        lp_grads = input_grads(delta_cosine_loss_reference(*lp, reduction="none", upcast=False), lp, weight)
    assert_close(out, ref, name="loss")
    for i in range(2):
        assert_close(grads[i], ref_grads[i], lp_grads[i], name=f"grad {i}")


def _soft_warp(shape, dtype, device=CPU, precision="auto"):
    B, N, M, Dq, C = shape
    x = [t.requires_grad_() for t in make_inputs(B, N, M, Dq, C, dtype=dtype, device=device, seed=Dq)]
    mask = make_mask("bool", B, N, device, torch.Generator().manual_seed(Dq))
    if dtype == torch.float32 and precision == "auto":
        precision = "ieee"  # compared at fp32 tolerances (on a GPU "auto" would pick tensor cores)
    out = soft_warp_loss(*x, mask, backend="triton", precision=precision)
    return out, torch.autograd.grad(out, x), x, mask


# fp32 inputs on tensor cores, as training runs them on a GPU (fp16 here also stands for its bf16 twin), checked
# at 1e-2 of the reference's largest entry: operands rounded to 10 mantissa bits (the interpreter's TF32 dot is
# fp32, its fp16 dot rounds the operands)
SOFT_WARP_PRECISIONS = ("tf32", "fp16")


def _check_soft_warp_precision(shape, precision, device):
    out, grads, x, mask = _soft_warp(shape, torch.float32, device, precision)
    r32 = [t.detach().requires_grad_() for t in x]
    ref = soft_warp_loss_reference(*r32, mask)
    ref_grads = torch.autograd.grad(ref, r32)
    for name, got, want in zip(("loss", *NAMES), (out, *grads), (ref, *ref_grads)):
        assert_close(got, want, name=f"{precision} {name}", atol=1e-2 * want.abs().max().item(), rtol=0.0)


def _check_soft_warp(shape, dtype, device):
    out, grads, x, mask = _soft_warp(shape, dtype, device)
    r32 = [t.detach().float().requires_grad_() for t in x]
    ref = soft_warp_loss_reference(*r32, mask)
    ref_grads = torch.autograd.grad(ref, r32)
    lp_out, lp_grads = None, (None,) * 4
    if dtype != torch.float32:
        lp = [t.detach().clone().requires_grad_() for t in x]
        lp_out = soft_warp_loss_reference(*lp, mask, upcast=False)
        lp_grads = torch.autograd.grad(lp_out, lp)
    assert_close(out, ref, None if lp_out is None else lp_out.float(), name="loss")
    for name, got, want, low in zip(("q_subj", "q_comp", "feat_subj", "feat_comp"), grads, ref_grads, lp_grads):
        assert_close(got, want, low, name=f"grad {name}")


def _ortho(shape, dtype, device=CPU):
    g = torch.Generator().manual_seed(shape[-1])
    a, b = (torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(2))
    out = ortho_subtract(a, b, backend="triton")
    dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return out, torch.autograd.grad(out, (a, b), dout), (a, b), dout


def _check_ortho(shape, dtype, device):
    out, grads, (a, b), dout = _ortho(shape, dtype, device)
    r32 = [t.detach().float().requires_grad_() for t in (a, b)]
    ref = ortho_subtract_reference(*r32)
    ref_grads = torch.autograd.grad(ref, r32, dout.float())
    lp_out, lp_grads = None, (None, None)
    if dtype != torch.float32:
        lp = [t.detach().clone().requires_grad_() for t in (a, b)]
        lp_out = ortho_subtract_reference(*lp, upcast=False)
        lp_grads = torch.autograd.grad(lp_out, lp, dout)
    assert_close(out, ref, lp_out, name="out")
    for name, got, want, low in zip("ab", grads, ref_grads, lp_grads):
        assert_close(got, want, low, name=f"grad {name}")


def _all_cases():
    for dtype in DTYPES:
        for case in ATTENTION:
            yield lambda c=case, d=dtype: _attention(*c, d)
        for case in DELTA:
            yield lambda c=case, d=dtype: _delta(*c, d)
        for case in SOFT_WARP:
            yield lambda c=case, d=dtype: _soft_warp(c, d)
        for case in ORTHO:
            yield lambda c=case, d=dtype: _ortho(c, d)
    for case in SOFT_WARP:
        for precision in SOFT_WARP_PRECISIONS:
            yield lambda c=case, p=precision: _soft_warp(c, torch.float32, precision=p)


def _key(rec: dict) -> str:
    """A configuration, with bf16 counted as its fp16 twin (same tiles and flags; only fp16 runs here), and
    without the JIT's shape-dependent specialisation hints (they change the compiled code, not its results)."""
    rec = {k: v for k, v in rec.items() if k not in ("divisible_by_16", "equal_to_1", "paper_shape")}
    return json.dumps(rec, sort_keys=True).replace('"bf16"', '"fp16"').replace("*bf16", "*fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through Triton's interpreter")
def test_every_configuration_is_executed():
    wanted = {_key(rec) for rec in CHECK.table()}
    with CHECK.recording() as records, CHECK.cuda_choices():
        for run in _all_cases():
            run()
    executed = {_key(rec) for rec in records.values()}
    missing = sorted(wanted - executed)
    assert not missing, f"{len(missing)} CUDA configuration(s) of the compile check's table run in no case here, " \
        f"e.g. {missing[0]}"


@pytest.fixture(autouse=True)
def _cuda_choices():
    with CHECK.cuda_choices():
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D, mode, causal", ATTENTION)
def test_expanded_attention_configuration(D, mode, causal, dtype, device):
    _check_attention(D, mode, causal, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, C", DELTA)
def test_delta_cosine_configuration(rows, C, dtype, device):
    _check_delta(rows, C, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SOFT_WARP, ids=lambda s: "x".join(map(str, s)))
def test_soft_warp_configuration(shape, dtype, device):
    _check_soft_warp(shape, dtype, device)


@pytest.mark.parametrize("precision", SOFT_WARP_PRECISIONS)
@pytest.mark.parametrize("shape", SOFT_WARP, ids=lambda s: "x".join(map(str, s)))
def test_soft_warp_precision_configuration(shape, precision, device):
    _check_soft_warp_precision(shape, precision, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ORTHO, ids=lambda s: "x".join(map(str, s)))
def test_ortho_subtract_configuration(shape, dtype, device):
    _check_ortho(shape, dtype, device)
