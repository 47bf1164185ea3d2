"""C++/CUDA extension `adaface._C`: the CPU kernels (backend "cpp") and, on a GPU, the CUDA kernels (backend
"cuda") of delta_cosine_loss and soft_warp_loss against the PyTorch references, forward and every gradient.

Tolerances (adaface.testing.tolerances, as the Triton tests): fp32 atol 1e-5 / rtol 1e-4; fp16 / bf16 at most
2× PyTorch's own error in that dtype (the reference run with upcast=False) plus a 4-ulp floor. Delta-cosine
losses are fp32 computed from the same input values, so they use the fp32 bound for every dtype. Huge soft-warp
logits (|S| ~ 1e4): both sides round S to ~|S|·2⁻²⁴, so fp32 is compared with atol = rtol = 2e-3 × the
reference's largest entry (as tests/test_soft_warp.py). Nearly parallel delta inputs: against an fp64
reference, the extension's error may be at most 3× the fp32 reference's own error plus a small floor.
Fresh buffers: `torch.use_deterministic_algorithms` with `fill_uninitialized_memory` makes every at::empty in
the C++ code NaN-filled, so an element a kernel forgets to write fails the comparison.

Everything but the missing-extension tests is skipped when the extension is not built.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaface.ops import (
    _backend,
    delta_cosine_loss,
    delta_cosine_loss_reference,
    soft_warp_loss,
    soft_warp_loss_reference,
)
from adaface.testing.delta_cosine_inputs import delta_cosine_inputs
from adaface.testing.device import extension_built, extension_runs_cuda
from adaface.testing.grads import assert_grads_close, input_grads
from adaface.testing.soft_warp_inputs import make_inputs, make_mask
from adaface.testing.tolerances import assert_close

HAS_EXT = extension_built()
HAS_CUDA_EXT = extension_runs_cuda()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="adaface._C is not built (pip install --no-build-isolation -e .)")
needs_cuda_ext = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA device and adaface._C built with CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DELTA_NAMES = ("subj_single", "subj_comp", "cls_single", "cls_comp")
WARP_NAMES = ("q_subj", "q_comp", "feat_subj", "feat_comp")


@pytest.fixture
def nan_fill():
    """at::empty / torch.empty return NaN-filled memory while the test runs."""
    import torch.utils.deterministic as det

    old_det, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    det.fill_uninitialized_memory = old_fill


@pytest.fixture
def cpu_threads():
    """Run with a given number of intra-op threads (the key-range split of the CPU backward depends on it)."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _leaves(xs, dtype=None, flags=None):
    flags = flags or [x.requires_grad for x in xs]
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_(f) for x, f in zip(xs, flags)]


# ---------------------------------------------------------------------------------------------------------
# delta cosine


def _check_delta(xs, backend, *, eps=1e-6, seed=1, grad_atol=None):
    dtype = xs[0].dtype
    lowp = dtype != torch.float32
    k_in = _leaves(xs)
    out = delta_cosine_loss(*k_in, eps=eps, reduction="none", backend=backend)
    r32 = _leaves(xs, torch.float32)
    ref = delta_cosine_loss_reference(*r32, eps=eps, reduction="none")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, name="loss")
    weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device) + 0.5
    grads, rgrads = input_grads(out, k_in, weight), input_grads(ref, r32, weight)
    lgrads = [None] * 4
    if lowp:
        lp_in = _leaves(xs)
        lp_out = delta_cosine_loss_reference(*lp_in, eps=eps, reduction="none", upcast=False)
        lgrads = input_grads(lp_out, lp_in, weight)
    assert_grads_close(DELTA_NAMES, grads, rgrads, lgrads, dtype=dtype, atol=grad_atol)
    return out, grads


def _check_delta_shape(shape, dtype, backend, device="cpu"):
    # C = 1: the rejection of a 1-D vector is b·eps/(a² + eps), rounding noise with eps = 1e-6 in any
    # implementation (the fp16 reference gives NaN); a large eps makes it well-conditioned. Its cosine is ±1, so
    # the exact gradient is 0 and both sides return rounding residue (~1e-7): an absolute bound there.
    one = shape[-1] == 1
    xs = delta_cosine_inputs(shape, dtype=dtype, device=device, requires_grad=True)
    out, grads = _check_delta(xs, backend, eps=1.0 if one else 1e-6, grad_atol=1e-6 if one else None)
    assert out.shape == shape[:-1]
    return out, grads, xs


DELTA_SHAPES = [(1, 1), (5, 7), (3, 33), (2, 3, 320), (2, 1281), (0, 9)]  # C = 0 is refused (test_empty_dims)


@needs_ext
@pytest.mark.parametrize("shape", DELTA_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_cpu_forward_and_grads(shape, dtype, nan_fill):
    _check_delta_shape(shape, dtype, "cpp")


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_delta_cpu_reductions(reduction):
    xs = delta_cosine_inputs((3, 4, 45), requires_grad=True)
    out = delta_cosine_loss(*xs, reduction=reduction, backend="cpp")
    ref = delta_cosine_loss_reference(*_leaves(xs), reduction=reduction)
    assert_close(out, ref, name=reduction)


@needs_ext
@pytest.mark.parametrize("parallel, shape", [(1e-2, (6, 320)), (1e-3, (4, 1281)), (1e-4, (4, 1281))])
def test_delta_cpu_nearly_parallel_vs_fp64(parallel, shape):
    """comp = single·(1+s) + s·noise: no cancellation may eat the deltas (error ≤ 3× the fp32 reference's)."""
    xs = delta_cosine_inputs(shape, seed=7, parallel=parallel, gen_dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
        out = fn(leaves)
        return out.detach().double(), [g.double() for g in input_grads(out, leaves, weight.to(out.dtype))]

    out64, g64 = run(lambda t: delta_cosine_loss_reference(*t, reduction="none", upcast=False), torch.float64)
    out32, g32 = run(lambda t: delta_cosine_loss_reference(*t, reduction="none"), torch.float32)
    outk, gk = run(lambda t: delta_cosine_loss(*t, reduction="none", backend="cpp"), torch.float32)

    def err(a, b):
        return (a - b).abs().max().item()

    assert err(outk, out64) <= 3 * err(out32, out64) + 1e-6, (err(outk, out64), err(out32, out64))
    for name, k, r, e in zip(DELTA_NAMES, gk, g32, g64):
        scale = e.abs().max().item()
        assert err(k, e) <= 3 * err(r, e) + 1e-6 * scale, (name, err(k, e), err(r, e))


@needs_ext
def test_delta_cpu_zero_rows_and_identical_inputs():
    xs = delta_cosine_inputs((6, 19), requires_grad=True)
    with torch.no_grad():
        for x in xs:
            x[1].zero_()  # Δ = 0 on both sides: cos = 0, loss 1
        xs[0][2].zero_()  # zero projection base: Δs = subj_comp
        xs[1][3].copy_(xs[0][3])  # subj_comp == subj_single: Δs ~ eps·b
        xs[2][4].zero_()
        xs[3][4].zero_()  # class side all zero
    out, grads = _check_delta(xs, "cpp")
    assert out[1].item() == 1.0
    assert all(torch.isfinite(g).all() for g in grads)


@needs_ext
@pytest.mark.parametrize("need", [(False, True, False, False), (True, True, False, False), (False, False, True, True)])
def test_delta_cpu_only_some_inputs_require_grad(need):
    xs = delta_cosine_inputs((5, 23), requires_grad=need)
    _check_delta(xs, "cpp")


@needs_ext
def test_delta_cpu_non_contiguous_inputs():
    base = delta_cosine_inputs((7, 40))
    xs = [x[:, ::2].requires_grad_() for x in base]  # stride 2 along C
    assert not xs[0].is_contiguous()
    _check_delta(xs, "cpp")


@needs_ext
@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    n_cols=st.integers(1, 300),
    parallel=st.sampled_from([None, 1e-2]),
    seed=st.integers(0, 10_000),
)
def test_delta_cpu_property_random_shapes(lead, n_cols, parallel, seed):
    xs = delta_cosine_inputs((*lead, n_cols), seed=seed, parallel=parallel, requires_grad=True)
    out = delta_cosine_loss(*_leaves(xs), reduction="none", backend="cpp")
    ref = delta_cosine_loss_reference(*_leaves(xs), reduction="none")
    # random small C can draw nearly parallel deltas, where the loss itself is ill-conditioned: relative bound
    assert_close(out, ref, name="loss", atol=1e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 1.0))


# ---------------------------------------------------------------------------------------------------------
# soft warp


def _check_warp(shape, dtype, backend, mask_kind="none", *, scale=1.0, seed=0, huge=False, need=None, device="cpu",
                x=None):
    """Loss and the gradients of the inputs that require grad vs the fp32 (and in-dtype) reference.

    C = 1: the cosine is ±1 and every exact gradient 0; both sides return the rounding residue of terms that
    cancel, g_n/|w_n| and g_n/|f_n| (g_n = the row's weight in the mean × upstream), carried to q/k/v by
    |feat_comp| · scale·(|q_subj| + |q_comp|): the bound is 16 fp32 ulps of the largest such term
    (`_c1_residue_bound`).
    Where PyTorch's own in-dtype run is not finite (fp16 with no keys), the 2×-PyTorch rule is meaningless and
    the fp32 bound is used.
    """
    B, N, M, Dq, C = shape
    if x is None:
        x = make_inputs(B, N, M, Dq, C, dtype=dtype, device=device, seed=seed, huge_logits=huge)
    mask = make_mask(mask_kind, B, N, torch.device(device), torch.Generator().manual_seed(seed + 7))
    flags = list(need or (True,) * 4)
    ins = _leaves(x, flags=flags)
    out = soft_warp_loss(*ins, mask, scale=scale, backend=backend)
    r32 = _leaves(x, torch.float32, flags)
    ref = soft_warp_loss_reference(*r32, mask, scale=scale)
    upstream = torch.tensor(1.7, device=out.device)
    grads, rgrads = input_grads(out, ins, upstream), input_grads(ref, r32, upstream)
    lowp = dtype != torch.float32
    lgrads = [None] * 4
    ref_lp = None
    if lowp:
        lp_in = _leaves(x, flags=flags)
        ref_lp = soft_warp_loss_reference(*lp_in, mask, scale=scale, upcast=False)
        lgrads = input_grads(ref_lp, lp_in, upstream)
    assert out.dtype == torch.float32 and out.shape == ()

    c1_atol = _c1_residue_bound(x, mask, scale, float(upstream)) if C == 1 else None

    def tol(r):
        if huge and not lowp:
            return dict(atol=2e-3 * r.abs().max().item(), rtol=2e-3)
        return dict(atol=c1_atol) if C == 1 else {}

    def finite(lp):
        return lp if lp is not None and torch.isfinite(lp.float()).all() else None

    assert_close(out, ref, finite(ref_lp.float()) if lowp else None, name="loss", **tol(ref))
    for name, g, r, lp in zip(WARP_NAMES, grads, rgrads, lgrads):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, finite(lp), name=f"grad {name}", **tol(r))
    return out, grads, mask


def _c1_residue_bound(x, mask, scale: float, upstream: float) -> float:
    """Rounding residue allowed for C = 1 (see _check_warp): 16 ulps(fp32) × max_n g_n·(1/|w_n| + 1/|f_n|) ×
    max(1, |feat_comp|max · scale·(|q_subj|max + |q_comp|max)), with w = the warped feature in fp64."""
    q, k, f, v = (t.detach().double() for t in x)
    B, N = q.shape[:2]
    if q.numel() == 0 or k.shape[1] == 0:
        return 1e-6
    w = torch.softmax(scale * q @ k.transpose(1, 2), dim=-1) @ v
    weights = torch.ones(B, N, dtype=torch.float64) if mask is None else mask.double()
    g = upstream * weights / weights.sum().clamp_min(1e-30)
    terms = g * (1 / w[..., 0].abs().clamp_min(1e-30) + 1 / f[..., 0].abs().clamp_min(1e-30))
    carry = max(1.0, v.abs().max().item() * abs(scale) * (q.abs().max().item() + k.abs().max().item()))
    return max(1e-6, 16 * 2.0**-24 * terms.max().item() * carry)


WARP_SHAPES = [  # (B, N, M, Dq, C): CPU tasks are blocks of min(256, 196608 // M) rows (at least 16); dK/dV
    # are updated in chunks of 256 keys under locks
    (1, 1, 1, 1, 1),
    (2, 5, 33, 7, 9),
    (2, 67, 301, 19, 45),  # two key chunks
    (1, 130, 517, 33, 17),  # three key chunks, B = 1
    (1, 259, 257, 37, 35),  # row blocks 256 + 3: tasks of one batch share dK/dV chunks (locks)
    (1, 70, 3000, 5, 6),  # row blocks of 65 rows + 5, twelve key chunks
    (2, 0, 6, 3, 4),  # no rows
]


@needs_ext
@pytest.mark.parametrize("shape", WARP_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_cpu_forward_and_grads(shape, dtype, nan_fill):
    _check_warp(shape, dtype, "cpp", scale=0.7)


@needs_ext
@pytest.mark.parametrize("shapes, match", [
    (((2, 6, 0), (2, 5, 0), (2, 6, 3), (2, 5, 3)), "`q_subj` has no query features"),
    (((2, 6, 4), (2, 0, 4), (2, 6, 3), (2, 0, 3)), "`q_comp` has no keys"),
    (((2, 6, 4), (2, 5, 4), (2, 6, 0), (2, 5, 0)), "`feat_subj` has no features"),
])
def test_empty_dims_are_refused_before_the_kernel(shapes, match):
    """An empty key, query-feature or feature dimension has no meaningful loss (a softmax over nothing, a cosine
    of empty vectors): refused by name on the C++ backend as on the others."""
    with pytest.raises(ValueError, match=match):
        soft_warp_loss(*(torch.randn(s) for s in shapes), backend="cpp")
    with pytest.raises(ValueError, match="`subj_single` has no features"):
        delta_cosine_loss(*(torch.randn(4, 0) for _ in range(4)), backend="cpp")


@needs_ext
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "zeros", "ones"])
def test_warp_cpu_mask_kinds(mask_kind):
    _check_warp((2, 70, 40, 11, 13), torch.float32, "cpp", mask_kind, seed=3)


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
def test_warp_cpu_thread_counts_split_the_keys(threads, cpu_threads):
    """B = 1, N = 800, M = 600: row blocks of 256 + 256 + 256 + 32, four tasks adding into the same three
    dK/dV key chunks (under locks), starting at different chunks, on 1 or 3 threads; with and without a mask
    (gathered rows)."""
    cpu_threads(threads)
    _check_warp((1, 800, 600, 9, 12), torch.float32, "cpp", "none", seed=5)
    _check_warp((1, 800, 600, 9, 12), torch.float32, "cpp", "bool", seed=6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_warp_cpu_huge_logits(dtype):
    _check_warp((2, 37, 290, 24, 10), dtype, "cpp", huge=True, seed=2)


@needs_ext
def test_warp_cpu_backward_tolerates_recomputed_logits_off_by_rounding():
    """With logits ~1e4 one fp32 ulp is ~1e-3, and the backward's recomputed logits need not match the forward's
    bit for bit (an FMA-contracted `scale·s − lse` on AVX-512 CPUs, another GEMM path). grad q_subj = dS·K
    cancels a large common part of K's rows, so dS must sum to zero over the keys with the backward's own
    probabilities: here the backward sees q_comp moved by one ulp on a third of its entries (logits move by
    ~1e-3) and must still give the float64 gradient (the 2e-3·max tolerance of the huge-logit test)."""
    from adaface.ops._extension import _ops

    x = make_inputs(2, 37, 290, 24, 10, huge_logits=True, seed=2)
    q, k, f, v = x
    weights = torch.ones(2, 37)
    g = torch.Generator().manual_seed(3)
    pick = torch.rand(k.shape, generator=g) < 1 / 3
    k_moved = torch.where(pick, torch.nextafter(k, torch.where(k > 0, k + 1, k - 1)), k)
    fwd = _ops().soft_warp_ext_fwd(q, k, f, v, weights, 1.0)
    grad_rows = torch.full((2, 37), 1.7 / 74)
    dq = _ops().soft_warp_ext_bwd(grad_rows, q, k_moved, f, v, weights, *fwd[1:], 1.0, True, False, False, False)[0]
    ins = [t.double().requires_grad_(True) for t in x]
    want = torch.autograd.grad(soft_warp_loss_reference(*ins, upcast=False) * 1.7, ins[0])[0]
    torch.testing.assert_close(dq.double(), want, atol=2e-3 * want.abs().max().item(), rtol=2e-3)


@needs_ext
def test_warp_cpu_masked_rows_are_zero_and_get_no_gradient():
    from adaface.ops._extension import soft_warp_rows_ext

    x = _leaves(make_inputs(2, 21, 13, 6, 8), flags=[True] * 4)
    mask = make_mask("bool", 2, 21, torch.device("cpu"), torch.Generator().manual_seed(1))
    rows = soft_warp_rows_ext(*x, mask.float(), 1.0)
    assert torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    grads = torch.autograd.grad(rows.sum(), x)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    assert torch.equal(grads[2][~mask], torch.zeros_like(grads[2][~mask]))
    with torch.no_grad():
        ref = soft_warp_loss_reference(*x, mask, scale=1.0)
    assert_close((rows * mask).sum() / mask.sum(), ref, name="masked mean")


@needs_ext
def test_warp_cpu_batch_without_selected_rows_gets_zero_gradients(nan_fill):
    """dK/dV chunks are written by their first update, not zero-filled first: a batch no task touches (all rows
    masked) must still come back as zeros, next to a batch with a partial selection (gathered rows)."""
    B, N, M, Dq, C = 2, 40, 300, 6, 7
    x = _leaves(make_inputs(B, N, M, Dq, C, seed=8), flags=[True] * 4)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, ::3] = True
    out = soft_warp_loss(*x, mask, backend="cpp")
    grads = torch.autograd.grad(out, x)
    r = _leaves(x, flags=[True] * 4)
    ref = soft_warp_loss_reference(*r, mask)
    want = torch.autograd.grad(ref, r)
    assert_close(out, ref, name="loss")
    for name, g, w in zip(WARP_NAMES, grads, want):
        assert torch.equal(g[0], torch.zeros_like(g[0])), name
        assert_close(g, w, name=f"grad {name}")


@needs_ext
@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, True), (False, False, True, False)])
def test_warp_cpu_only_some_inputs_require_grad(need):
    _check_warp((2, 17, 29, 5, 6), torch.float32, "cpp", "bool", need=need)


@needs_ext
@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2), N=st.integers(1, 80), M=st.integers(1, 300), Dq=st.integers(1, 24), C=st.integers(1, 24),
    scale=st.sampled_from([1.0, 0.25]), seed=st.integers(0, 10_000),
)
def test_warp_cpu_property_random_shapes(B, N, M, Dq, C, scale, seed):
    _check_warp((B, N, M, Dq, C), torch.float32, "cpp", "bool", scale=scale, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# torch.compile, errors, registration


def _compile_inputs():
    ds = delta_cosine_inputs((3, 5, 21), requires_grad=(True, True, False, False))
    x = make_inputs(2, 9, 13, 5, 7)
    qs, fc = x[0].clone().requires_grad_(), x[3].clone().requires_grad_()
    mask = make_mask("bool", 2, 9, torch.device("cpu"), torch.Generator().manual_seed(0))
    return (*ds, qs, x[1], x[2], fc, mask)


def _check_compiled(f, args, *, fullgraph):
    compiled = torch.compile(f, fullgraph=fullgraph)
    out = compiled(*args)
    leaves = (args[0], args[1], args[4], args[7])
    got = torch.autograd.grad(out, leaves)
    r = [t.detach().clone().requires_grad_() for t in leaves]
    ref = delta_cosine_loss_reference(r[0], r[1], args[2], args[3]) + soft_warp_loss_reference(
        r[2], args[5], args[6], r[3], args[8]
    )
    want = torch.autograd.grad(ref, r)
    assert_close(out.detach(), ref.detach(), name="compiled loss")
    for name, g, w in zip(("subj_single", "subj_comp", "q_subj", "feat_comp"), got, want):
        assert_close(g, w, name=f"compiled grad {name}")


def _check_one_graph(f):
    """`f` over `_compile_inputs()` traces into one graph (no break), and compiled it matches the references."""
    import torch._dynamo

    torch._dynamo.reset()
    args = _compile_inputs()
    explain = torch._dynamo.explain(f)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    _check_compiled(f, args, fullgraph=True)


@needs_ext
def test_torch_compile_traces_the_ops_without_graph_break():
    """The extension ops (fake impls + register_autograd) trace into one graph, forward and backward."""
    from adaface.ops._extension import delta_cosine_rows_ext, soft_warp_rows_ext
    from adaface.ops.soft_warp import masked_row_mean

    def f(a, b, c, d, qs, qc, fs, fc, mask):
        w = mask.float()
        return delta_cosine_rows_ext(a, b, c, d, 1e-6).mean() + masked_row_mean(
            soft_warp_rows_ext(qs, qc, fs, fc, w, 1.0), w
        )

    _check_one_graph(f)


@needs_ext
def test_torch_compile_public_ops():
    """The public ops, dispatch included, trace into one graph (the extension is probed at import, not here)."""

    def f(a, b, c, d, qs, qc, fs, fc, mask):
        return delta_cosine_loss(a, b, c, d, backend="cpp") + soft_warp_loss(qs, qc, fs, fc, mask, backend="cpp")

    _check_one_graph(f)


@needs_ext
def test_fake_implementations_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.adaface
    ds = delta_cosine_inputs((2, 3, 10))
    sw = make_inputs(2, 5, 7, 3, 4)
    w = torch.ones(2, 5)
    real = [
        ops.delta_cosine_ext_fwd(*ds, 1e-6),
        ops.soft_warp_ext_fwd(*sw, w, 1.0),
    ]
    real_d = ops.delta_cosine_ext_bwd(real[0][0], *ds, real[0][1], 1e-6, [1, 0, 1, 0])
    real_s = ops.soft_warp_ext_bwd(real[1][0], *sw, w, *real[1][1:], 1.0, False, True, True, False)
    with FakeTensorMode() as mode:
        fds = [mode.from_tensor(t) for t in ds]
        fsw = [mode.from_tensor(t) for t in sw]
        fw = mode.from_tensor(w)
        fake = [ops.delta_cosine_ext_fwd(*fds, 1e-6), ops.soft_warp_ext_fwd(*fsw, fw, 1.0)]
        fake_d = ops.delta_cosine_ext_bwd(fake[0][0], *fds, fake[0][1], 1e-6, [1, 0, 1, 0])
        fake_s = ops.soft_warp_ext_bwd(fake[1][0], *fsw, fw, *fake[1][1:], 1.0, False, True, True, False)
    for r, f in zip([*real[0], *real[1], *real_d, *real_s], [*fake[0], *fake[1], *fake_d, *fake_s]):
        assert r.shape == f.shape and r.dtype == f.dtype


@needs_ext
def test_ops_reject_bad_inputs_from_cpp():
    ops = torch.ops.adaface
    a = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.delta_cosine_ext_fwd(a, a, a, torch.zeros(3, 5), 1e-6)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.delta_cosine_ext_fwd(*(torch.zeros(3, 4, dtype=torch.float64),) * 4, 1e-6)
    q = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="weights must be"):
        ops.soft_warp_ext_fwd(q, q, q, q, torch.ones(2, 4), 1.0)


def test_missing_extension_raises_build_instructions(monkeypatch):
    """Import failure of adaface._C → RuntimeError that says how to build it; the ops' cpp/cuda backends too."""
    monkeypatch.setitem(sys.modules, "adaface._C", None)  # `import adaface._C` now raises ImportError
    module, error, broken = _backend._probe_extension()
    assert module is None and error and not broken  # not built: expected, no warning
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    monkeypatch.setattr(_backend, "_EXTENSION_ERROR", error)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _backend.load_extension()
    assert not _backend.extension_available()
    xs = delta_cosine_inputs((2, 5))
    with pytest.raises(RuntimeError, match="ADAFACE_BUILD_EXT=0"):
        delta_cosine_loss(*xs, backend="cpp")
    with pytest.raises(RuntimeError, match="pip install"):
        soft_warp_loss(*make_inputs(1, 2, 3, 4, 5), backend="cpp")
    assert delta_cosine_loss(*xs, backend="auto").isfinite()  # the default never needs the extension


_BROKEN_IMPORT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class Broken(importlib.abc.MetaPathFinder):  # adaface._C exists but cannot load, as after a torch upgrade
        def find_spec(self, name, path=None, target=None):
            if name == "adaface._C":
                raise {exc}("adaface/_C.so: undefined symbol: _ZN3c1017RegisterOperators")
            return None

    sys.meta_path.insert(0, Broken())
    import torch
    from adaface.ops import delta_cosine_loss, soft_warp_loss
    from adaface.testing.delta_cosine_inputs import delta_cosine_inputs
    from adaface.testing.soft_warp_inputs import make_inputs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.isfinite(delta_cosine_loss(*delta_cosine_inputs((2, 5)), backend="auto"))
            assert torch.isfinite(soft_warp_loss(*make_inputs(1, 2, 3, 4, 5), backend="auto"))
    msgs = [str(w.message) for w in caught if "adaface._C" in str(w.message)]
    print(len(msgs))
    print(msgs[0] if msgs else "")
""")


@pytest.mark.parametrize("exc", ["ImportError", "OSError"])
def test_broken_extension_warns_once_and_auto_falls_back(exc):
    """An adaface._C that exists but fails to load is not silent: `auto` falls back with one warning naming the
    error (a fresh interpreter, where the extension is probed at import)."""
    proc = subprocess.run([sys.executable, "-c", _BROKEN_IMPORT.format(exc=exc)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, message = proc.stdout.strip().splitlines()[-2:]
    assert count == "1", proc.stdout
    assert f"{exc}: adaface/_C.so: undefined symbol" in message and "pip install" in message


def test_missing_extension_does_not_warn(monkeypatch):
    monkeypatch.setitem(sys.modules, "adaface._C", None)
    module, error, broken = _backend._probe_extension()
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    monkeypatch.setattr(_backend, "_EXTENSION_ERROR", error)
    monkeypatch.setattr(_backend, "_EXTENSION_BROKEN", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert delta_cosine_loss(*delta_cosine_inputs((2, 5)), backend="auto").isfinite()


@needs_ext
def test_out_of_date_extension_is_broken_not_used(monkeypatch):
    """A build older than the package (it lacks an op the package calls) counts as broken: `auto` warns and
    falls back instead of dispatching to an op that does not exist."""
    monkeypatch.setattr(_backend, "EXTENSION_OPS", _backend.EXTENSION_OPS + ("soft_warp_fwd_ext_v0",))
    module, error, broken = _backend._probe_extension()
    assert module is None and broken and "out of date" in error and "soft_warp_fwd_ext_v0" in error
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    monkeypatch.setattr(_backend, "_EXTENSION_ERROR", error)
    monkeypatch.setattr(_backend, "_EXTENSION_BROKEN", broken)
    monkeypatch.setattr(_backend, "_WARNED_BROKEN", False)
    with pytest.warns(RuntimeWarning, match="out of date"):
        assert delta_cosine_loss(*delta_cosine_inputs((2, 5)), backend="auto").isfinite()


@needs_ext
def test_op_names_follow_one_pattern():
    """adaface::{op}_{backend}_{fwd|bwd}; the old names are gone."""
    ops = torch.ops.adaface
    for name in ("delta_cosine_ext_fwd", "delta_cosine_ext_bwd", "soft_warp_ext_fwd", "soft_warp_ext_bwd"):
        assert hasattr(ops, name), name
    for old in ("delta_cosine_fwd_ext", "delta_cosine_bwd_ext", "soft_warp_fwd_ext", "soft_warp_bwd_ext",
                "cpu_gemm_ext", "cpu_gemm_impl_ext", "cpu_gemm_uses_avx512_ext"):
        assert not hasattr(ops, old), old


def _triton_soft_warp():
    pytest.importorskip("triton")
    from adaface.kernels import soft_warp as kernels

    return kernels.soft_warp_fwd, kernels.soft_warp_bwd


@needs_ext
@pytest.mark.parametrize("mask_kind", ["none", "bool", "zeros"])
def test_soft_warp_saved_state_is_the_triton_contract(mask_kind):
    """The extension's forward saves what the Triton forward saves (rows, warped, base-2 lse, order, count), and
    either backward takes either forward's state: one saved state for every backend."""
    triton_fwd, triton_bwd = _triton_soft_warp()
    B, N, M, Dq, C = 2, 21, 13, 6, 8
    x = make_inputs(B, N, M, Dq, C, seed=3)
    mask = make_mask(mask_kind, B, N, torch.device("cpu"), torch.Generator().manual_seed(2))
    w = torch.ones(B, N) if mask is None else mask.float()
    ext = torch.ops.adaface.soft_warp_ext_fwd(*x, w, 0.7)
    tri = triton_fwd(*x, w, 0.7)
    assert len(ext) == len(tri) == 5
    for name, e, t in zip(("rows", "warped", "lse2", "order", "count"), ext, tri):
        assert e.shape == t.shape and e.dtype == t.dtype, name
    rows_e, warped_e, lse_e, order_e, count_e = ext
    rows_t, warped_t, lse_t, order_t, count_t = tri
    assert torch.equal(order_e, order_t) and torch.equal(count_e, count_t)
    assert_close(rows_e, rows_t, name="rows")
    sel = torch.arange(N)[None, :] < count_t[:, None].long()  # positions of the selected rows in `order`
    for b in range(B):
        picked = order_t[b][sel[b]].long()
        assert_close(warped_e[b, picked], warped_t[b, picked], name="warped (selected rows)")
        assert_close(lse_e[b, picked], lse_t[b, picked], name="lse2 (selected rows)")
    g = torch.rand(B, N, generator=torch.Generator().manual_seed(4))
    needs = (True, True, True, True)
    own = torch.ops.adaface.soft_warp_ext_bwd(g, *x, w, *ext[1:], 0.7, *needs)
    ext_from_triton = torch.ops.adaface.soft_warp_ext_bwd(g, *x, w, *tri[1:], 0.7, *needs)
    triton_from_ext = triton_bwd(g, *x, w, *ext[1:], 0.7, *needs)
    triton_own = triton_bwd(g, *x, w, *tri[1:], 0.7, *needs)
    for name, a, b_, c, d in zip(WARP_NAMES, own, ext_from_triton, triton_from_ext, triton_own):
        assert_close(b_, a, name=f"ext bwd on triton state: {name}")
        assert_close(c, d, name=f"triton bwd on ext state: {name}")
        assert_close(a, d, name=f"ext vs triton: {name}")


@needs_ext
def test_soft_warp_bwd_rejects_a_foreign_saved_state():
    x = make_inputs(1, 4, 5, 3, 2)
    w = torch.ones(1, 4)
    rows, warped, lse, order, count = torch.ops.adaface.soft_warp_ext_fwd(*x, w, 1.0)
    with pytest.raises(RuntimeError, match="order must be int32"):
        torch.ops.adaface.soft_warp_ext_bwd(rows, *x, w, warped, lse, order.long(), count, 1.0, True, True, True, True)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.adaface.soft_warp_ext_bwd(rows, *x, w, warped, lse, order + 9, count, 1.0, True, True, True, True)


def test_wrong_device_backends_are_explained():
    xs = delta_cosine_inputs((2, 5))
    with pytest.raises(ValueError, match="use 'cpp' for CPU"):
        delta_cosine_loss(*xs, backend="cuda")


@needs_ext
def test_extension_flavour_matches_build():
    ext = _backend.load_extension()
    assert ext.WITH_CUDA in (0, 1)
    if ext.WITH_CUDA:
        assert torch.version.cuda is not None


# ---------------------------------------------------------------------------------------------------------
# CUDA kernels (skipped without a GPU): against the reference and against the Triton backend


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 320), (3, 1281), (0, 9), (2, 4096, 320)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_cuda_forward_and_grads(shape, dtype, nan_fill):
    out, _, xs = _check_delta_shape(shape, dtype, "cuda", device="cuda")
    eps = 1.0 if shape[-1] == 1 else 1e-6
    out_t = delta_cosine_loss(*_leaves(xs), eps=eps, reduction="none", backend="triton")
    assert_close(out, out_t, name="cuda vs triton loss")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("parallel", [1e-3, 1e-4])
def test_delta_cuda_nearly_parallel(parallel):
    xs = delta_cosine_inputs((8, 1281), seed=7, parallel=parallel, gen_dtype=torch.float64)
    x64 = [x.cuda() for x in xs]
    out64 = delta_cosine_loss_reference(*x64, reduction="none", upcast=False)
    out32 = delta_cosine_loss_reference(*[x.float() for x in x64], reduction="none")
    outk = delta_cosine_loss(*[x.float() for x in x64], reduction="none", backend="cuda")
    assert (outk.double() - out64).abs().max() <= 3 * (out32.double() - out64).abs().max() + 1e-6


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 67, 301, 19, 45), (2, 130, 97, 320, 40),
                                   (2, 1024, 1024, 320, 320)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "zeros"])
def test_warp_cuda_forward_and_grads(shape, dtype, mask_kind):
    out, grads, mask = _check_warp(shape, dtype, "cuda", mask_kind, scale=0.7, device="cuda")
    B, N, M, Dq, C = shape
    x = [t.requires_grad_() for t in make_inputs(B, N, M, Dq, C, dtype=dtype, device="cuda")]
    out_t = soft_warp_loss(*x, mask, scale=0.7, backend="triton")
    assert_close(out, out_t.detach(), name="cuda vs triton loss", atol=1e-4 if dtype != torch.float32 else None)


@pytest.mark.gpu
@needs_cuda_ext
def test_warp_cuda_huge_logits():
    _check_warp((2, 37, 290, 24, 10), torch.float32, "cuda", "bool", huge=True, seed=2, device="cuda")


@pytest.mark.gpu
@needs_cuda_ext
def test_warp_cuda_only_some_inputs_require_grad():
    _check_warp((2, 17, 29, 5, 6), torch.float32, "cuda", "bool", need=(False, True, False, True), device="cuda")


@needs_ext
def test_auto_prefers_the_cpp_losses_on_cpu():
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("auto", cpu, "op", supports=("torch", "triton", "cuda", "cpp")) == "cpp"
    assert _backend.resolve_backend("auto", cpu, "op", supports=("torch", "triton")) == "torch"
