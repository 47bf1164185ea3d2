"""delta_cosine_loss: Triton kernels (interpreted on CPU) against the PyTorch reference, forward and gradients.

Tolerances: the loss is fp32 whatever the input dtype and both sides compute it in fp32 from the same input
values, so the forward uses the fp32 bound (adaface.testing.tolerances: atol 1e-5, rtol 1e-4) for every
input dtype. Gradients in fp32 use the same bound; fp16/bf16 gradients (stored in the input dtype) use
flash-attention's rule: at most 2× the error PyTorch makes running the reference in that dtype, plus a
4-ulp floor. Nearly parallel inputs: against an fp64 reference, the kernel's error may be at most 3× the
fp32 reference's own error plus a small floor (a naive closed form in dot products misses this by ~1000×).
Every buffer the launchers allocate is NaN-filled first (autouse fixture), so a value a kernel forgets to
write fails the comparison.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaface.kernels import delta_cosine as K
from adaface.kernels._runtime import forced_tiles
from adaface.ops import delta_cosine_loss, delta_cosine_loss_reference
from adaface.testing.delta_cosine_inputs import delta_cosine_inputs
from adaface.testing.grads import assert_grads_close, input_grads
from adaface.testing.tolerances import assert_close

SHAPES = [(1, 1), (5, 7), (3, 33), (2, 3, 320), (2, 1281), (0, 9)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("subj_single", "subj_comp", "cls_single", "cls_comp")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    def nan_empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(K, "_empty", nan_empty)


@pytest.fixture
def force_chunk():
    """Force the split path: rows longer than `chunk` are reduced across programs through the workspace."""
    with contextlib.ExitStack() as stack:

        def force(chunk: int) -> None:
            stack.enter_context(forced_tiles(K, BLOCK_C=chunk))

        yield force


def _kernel(xs, reduction="none", eps=1e-6):
    return delta_cosine_loss(*xs, eps=eps, reduction=reduction, backend="triton")


def _reference(xs, reduction="none", eps=1e-6, upcast=True):
    return delta_cosine_loss_reference(*xs, eps=eps, reduction=reduction, upcast=upcast)


def _leaf_copies(xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_(x.requires_grad) for x in xs]


def _check_against_reference(xs, *, reduction="none", eps=1e-6, seed=1, grad_atol=None):
    """Kernel forward and every gradient vs the fp32 reference (and, for fp16/bf16, the reference in dtype)."""
    dtype = xs[0].dtype
    lowp = dtype != torch.float32
    k_in = _leaf_copies(xs)
    out = _kernel(k_in, reduction, eps)
    r32_in = _leaf_copies(xs, torch.float32)
    ref32 = _reference(r32_in, reduction, eps)
    assert out.dtype == torch.float32
    assert_close(out, ref32, name="loss")  # fp32 math on both sides, whatever the input dtype
    weight = None
    if reduction == "none" and out.numel():
        weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device) + 0.5
    grads = input_grads(out, k_in, weight)
    ref_grads = input_grads(ref32, r32_in, weight)
    lp_grads = [None] * 4
    if lowp:
        lp_in = _leaf_copies(xs)
        lp_grads = input_grads(_reference(lp_in, reduction, eps, upcast=False), lp_in, weight)
    assert_grads_close(NAMES, grads, ref_grads, lp_grads, dtype=dtype, atol=grad_atol)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_grads_match_reference(shape, dtype, device):
    xs = delta_cosine_inputs(shape, dtype=dtype, device=device, requires_grad=True)
    # C = 1: the rejection of a 1-D vector is b·eps/(a² + eps), which with eps = 1e-6 is fp32 rounding noise
    # of b − αa in any implementation (the reference's too); a large eps makes that case well-conditioned.
    # Its cosine is ±1, so the exact gradient is 0 and both sides return rounding residue (~1e-7).
    one = shape[-1] == 1
    out = _check_against_reference(xs, eps=1.0 if one else 1e-6, grad_atol=1e-6 if one else None)
    assert out.shape == shape[:-1]


@pytest.mark.parametrize(
    "shape, chunk",
    [((3, 100), 16), ((1, 4, 257), 64), ((2, 1281), 256), ((2, 33), 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_path_matches_reference(shape, chunk, dtype, device, force_chunk):
    force_chunk(chunk)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    assert K.tiles(rows, shape[-1])["BLOCK_C"] < shape[-1], "the split path must run"
    xs = delta_cosine_inputs(shape, dtype=dtype, device=device, seed=3, requires_grad=True)
    _check_against_reference(xs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction, device):
    xs = delta_cosine_inputs((4, 6, 33), device=device, seed=5, requires_grad=True)
    out = _check_against_reference(xs, reduction=reduction)
    assert out.shape == ((4, 6) if reduction == "none" else ())


@pytest.mark.parametrize("eps", [0.0, 1e-2, 10.0])
def test_eps(eps, device):
    xs = delta_cosine_inputs((3, 45), device=device, seed=6, requires_grad=True)
    _check_against_reference(xs, eps=eps)


def _check_vs_fp64(xs, factor, floor):
    """Kernel error against an fp64 reference ≤ factor × the fp32 reference's own error + floor (× scale)."""
    rows = xs[0].shape[:-1]
    weight = torch.linspace(0.5, 1.5, max(1, rows.numel()), device=xs[0].device)[: rows.numel()].view(rows)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
        out = fn(leaves)
        return out.detach().double(), [g.double() for g in input_grads(out, leaves, weight.to(out.dtype))]

    out64, g64 = run(lambda t: _reference(t, upcast=False), torch.float64)  # fp64 all the way
    out32, g32 = run(_reference, torch.float32)
    outk, gk = run(_kernel, torch.float32)

    def err(a, b):
        return (a - b).abs().max().item() if a.numel() else 0.0

    assert err(outk, out64) <= factor * err(out32, out64) + floor, ("loss", err(outk, out64), err(out32, out64))
    for name, k, r, e in zip(NAMES, gk, g32, g64):
        scale = e.abs().max().item() if e.numel() else 0.0
        assert err(k, e) <= factor * err(r, e) + floor * scale, (name, err(k, e), err(r, e), scale)


@pytest.mark.parametrize(
    "parallel, shape, chunk",
    [(1e-2, (6, 320), None), (1e-3, (6, 320), None), (1e-3, (4, 1281), None), (1e-3, (3, 1281), 128),
     (1e-4, (4, 1281), None)],
)
def test_nearly_parallel_inputs_vs_fp64(parallel, shape, chunk, device, force_chunk):
    """comp = single·(1+s) + s·noise: the deltas are ~s of the inputs; no cancellation may eat the result."""
    if chunk is not None:
        force_chunk(chunk)
    xs = delta_cosine_inputs(shape, device=device, seed=7, parallel=parallel, gen_dtype=torch.float64)
    _check_vs_fp64([x.float() for x in xs], factor=3.0, floor=1e-6)


@pytest.mark.parametrize("chunk", [None, 16])
def test_zero_rows_give_finite_values(chunk, device, force_chunk):
    if chunk is not None:
        force_chunk(chunk)
    xs = [x.detach() for x in delta_cosine_inputs((5, 33), device=device, seed=8)]
    xs[0][0], xs[1][0], xs[2][0], xs[3][0] = 0, 0, 0, 0  # all four zero
    xs[0][1], xs[1][1] = 0, 0  # subject side zero: Δs = 0
    xs[0][2] = 0  # subject single zero: Δs = subj_comp
    xs[2][3], xs[3][3] = 0, 0  # class side zero
    xs = [x.requires_grad_() for x in xs]
    out = _check_against_reference(xs)
    assert out[0].item() == 1.0 and out[1].item() == 1.0 and out[3].item() == 1.0


@pytest.mark.parametrize(
    "need",
    [(True, True, False, False), (False, True, False, False), (False, False, True, True), (True, False, False, True)],
)
def test_only_some_inputs_require_grad(need, device, monkeypatch):
    seen = []
    real_bwd = K.delta_cosine_bwd

    def spy(grad, ss, sc, cs, cc, st, flags):
        seen.append(tuple(flags))
        return real_bwd(grad, ss, sc, cs, cc, st, flags)

    monkeypatch.setattr(K, "delta_cosine_bwd", spy)
    xs = delta_cosine_inputs((3, 7, 21), device=device, seed=9, requires_grad=need)
    _check_against_reference(xs)
    assert seen == [need], "the backward must write only the gradients asked for"


def test_no_grad_skips_backward_scalars(device, monkeypatch):
    seen = []
    real_fwd = K.delta_cosine_fwd

    def spy(*args, stats=True):
        seen.append(stats)
        return real_fwd(*args, stats=stats)

    monkeypatch.setattr(K, "delta_cosine_fwd", spy)
    xs = delta_cosine_inputs((4, 19), device=device, seed=10, requires_grad=True)
    with torch.no_grad():
        out = _kernel(xs)
    assert_close(out, _reference([x.detach() for x in xs]), name="loss")
    assert seen == [False]


def test_non_contiguous_inputs(device):
    xs = [x.detach().t().requires_grad_() for x in delta_cosine_inputs((37, 6), device=device, seed=11)]
    assert not xs[0].is_contiguous()
    _check_against_reference(xs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n_cols=st.integers(2, 150),
    chunk=st.sampled_from([None, 16, 64]),
    parallel=st.sampled_from([None, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(lead, n_cols, chunk, parallel, seed, device):
    """Random small C can draw nearly parallel vectors by chance, where a fixed fp32 tolerance against the fp32
    reference is not a fair bound (both err alike): judge both against fp64 instead."""
    xs = delta_cosine_inputs((*lead, n_cols), device=device, seed=seed, parallel=parallel)
    with forced_tiles(K, BLOCK_C=chunk) if chunk else contextlib.nullcontext():
        _check_vs_fp64(xs, factor=4.0, floor=1e-5)


def test_torch_compile_without_graph_break(device):
    import torch._dynamo

    torch._dynamo.reset()
    xs = delta_cosine_inputs((3, 5, 19), device=device, seed=12, requires_grad=(False, True, False, False))

    def f(ss, sc, cs, cc):
        return delta_cosine_loss(ss, sc, cs, cc, backend="triton") * 2.0

    explain = torch._dynamo.explain(f)(*xs)
    assert explain.graph_break_count == 0, explain.break_reasons
    out = torch.compile(f, fullgraph=True)(*xs)
    (g,) = torch.autograd.grad(out, (xs[1],))
    leaves = _leaf_copies(xs)
    ref = _reference(leaves, reduction="mean") * 2.0
    (rg,) = torch.autograd.grad(ref, (leaves[1],))
    assert_close(out.detach(), ref.detach(), name="compiled loss")
    assert_close(g, rg, name="compiled grad subj_comp")


def _bad(shape=(3, 4), **over):
    xs = {n: torch.zeros(shape) for n in NAMES}
    xs.update(over)
    return xs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (_bad(subj_comp=torch.zeros(3, 5)), "`subj_comp` must have the shape of `subj_single`"),
        (_bad(cls_single=torch.zeros(2, 4)), "`cls_single` must have the shape"),
        (_bad(cls_comp=torch.zeros(3, 4, dtype=torch.float16)), "`cls_comp` has dtype"),
        (_bad(subj_single=torch.zeros(3, 4, dtype=torch.float64)), "`subj_single` must have dtype"),
        (_bad(cls_comp=torch.zeros(3, 4, dtype=torch.int64)), "`cls_comp` must have dtype"),
        (_bad(subj_comp=torch.zeros(3, 4, device="meta")), "`subj_comp` is on meta"),
        (_bad(shape=()), "`subj_single` must have at least 1"),
        (_bad(shape=(4, 0)), "`subj_single` has no features"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        delta_cosine_loss(**kwargs, backend="triton")


@pytest.mark.parametrize(
    "extra, match",
    [({"reduction": "avg"}, "`reduction` must be one of"), ({"eps": -1.0}, "`eps` must be"),
     ({"eps": float("inf")}, "`eps` must be a finite non-negative number, got inf"),
     ({"eps": float("nan")}, "`eps` must be a finite non-negative number, got nan"),
     ({"eps": True}, "`eps` must be a finite"),
     ({"backend": "fast"}, "backend must be one of")],
)
def test_bad_arguments(extra, match):
    with pytest.raises(ValueError, match=match):
        delta_cosine_loss(*(torch.zeros(3, 4) for _ in NAMES), **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 4096, 320), (2, 1310720)], ids=["per_token", "long_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_scale_on_gpu(shape, dtype, device):
    """Paper-scale per-token rows and whole flattened maps (default tiles: the split path for the long rows)."""
    xs = delta_cosine_inputs(shape, dtype=dtype, device=device, seed=13, parallel=1e-2, requires_grad=True)
    _check_against_reference(xs)
    if dtype == torch.float32:
        _check_vs_fp64(xs, factor=3.0, floor=1e-6)


def test_reference_upcast_keeps_deltas_in_fp32():
    """The reference's upcast=True computes in fp32 throughout: the small deltas are not rounded to bf16."""
    xs = delta_cosine_inputs((4, 65), dtype=torch.bfloat16, seed=14, parallel=1e-2)
    got = _reference(xs)
    want = _reference([x.float() for x in xs])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_zero_rows_with_zero_eps_stay_finite(device):
    """eps = 0 and an all-zero row: the reference divides 0/0 (NaN); the kernel guards α and stays finite."""
    xs = [x.detach() for x in delta_cosine_inputs((3, 20), device=device, seed=15)]
    for x in xs:
        x[1] = 0
    xs = [x.requires_grad_() for x in xs]
    out = _kernel(xs, eps=0.0)
    assert out[1].item() == 1.0
    assert_close(out[[0, 2]], _reference([x.detach() for x in xs], eps=0.0)[[0, 2]], name="loss")
    grads = torch.autograd.grad(out.sum(), xs)
    assert all(torch.isfinite(g).all() for g in grads)


def _backends():
    from adaface.ops._backend import extension_available

    return ["torch", "triton", *(["cpp"] if extension_available() else [])]


@pytest.mark.parametrize("zero", ["subject-equal", "subject-zero", "class-equal", "class-zero"])
def test_zero_composition_delta_is_one_with_no_gradient_on_every_backend(zero, device):
    """A composition feature equal to its single one (or all zero) has no delta: the documented loss is 1 with zero
    gradient, the same on every backend; the other rows keep their ordinary values and gradients."""
    xs = [x.detach() for x in delta_cosine_inputs((3, 37), device=device, seed=21)]
    single, comp = (0, 1) if zero.startswith("subject") else (2, 3)
    xs[comp][1] = xs[single][1] if zero.endswith("equal") else 0
    results = {}
    for backend in _backends():
        if backend == "cpp" and device.type != "cpu":
            continue
        ins = [x.clone().requires_grad_() for x in xs]
        rows = delta_cosine_loss(*ins, reduction="none", backend=backend)
        grads = torch.autograd.grad(rows.sum(), ins)
        results[backend] = rows.detach(), grads
    for backend, (rows, grads) in results.items():
        assert rows[1].item() == 1.0, backend
        assert all(g[1].abs().max().item() == 0 for g in grads), backend
        assert all(torch.isfinite(g).all() and g.abs().max() < 1e3 for g in grads), backend
        ref_rows, ref_grads = results["torch"]
        assert_close(rows, ref_rows, name=f"{backend} loss")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, name=f"{backend} grad")
