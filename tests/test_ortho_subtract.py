"""ortho_subtract: Triton kernel (interpreted on CPU) against the PyTorch reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from adaface.ops import ortho_subtract, ortho_subtract_reference
from adaface.testing.tolerances import assert_close

SHAPES = [(1, 1), (3, 7), (2, 5, 33), (4, 129), (1, 4097), (0, 9)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_grads_match_reference(shape, dtype, device):
    a, b = _inputs(shape, dtype, device)
    a_k, b_k = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = ortho_subtract(a_k, b_k, backend="triton")
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    ref32 = ortho_subtract_reference(a32, b32)
    a_l, b_l = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref_lp = ortho_subtract_reference(a_l, b_l, upcast=False)  # PyTorch's own error in dtype
    assert out.dtype == dtype
    assert_close(out, ref32, ref_lp if dtype != torch.float32 else None, name="out")
    if out.numel() == 0:
        return
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    ga, gb = torch.autograd.grad(out, (a_k, b_k), grad)
    ra, rb = torch.autograd.grad(ref32, (a32, b32), grad.float())
    la, lb = torch.autograd.grad(ref_lp, (a_l, b_l), grad)
    assert_close(ga, ra, la if dtype != torch.float32 else None, name="grad a")
    assert_close(gb, rb, lb if dtype != torch.float32 else None, name="grad b")


def test_result_is_orthogonal_to_b(device):
    a, b = _inputs((6, 50), torch.float32, device)
    out = ortho_subtract(a, b * 1e3, backend="triton")
    cos = torch.nn.functional.cosine_similarity(out, b, dim=-1)
    assert cos.abs().max() < 1e-4


def test_zero_b_returns_a_and_finite_grads(device):
    a = torch.randn(3, 17, device=device, requires_grad=True)
    b = torch.zeros(3, 17, device=device, requires_grad=True)
    out = ortho_subtract(a, b, backend="triton")
    torch.testing.assert_close(out, a.detach())
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_only_b_requires_grad(device):
    a, b = _inputs((4, 21), torch.float32, device)
    b.requires_grad_()
    out = ortho_subtract(a, b, backend="triton")
    (gb,) = torch.autograd.grad(out.square().sum(), (b,))
    b32 = b.detach().clone().requires_grad_()
    (rb,) = torch.autograd.grad(ortho_subtract_reference(a, b32).square().sum(), (b32,))
    assert_close(gb, rb, name="grad b")


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), "`b` must have the shape of `a`"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float16), "`b` has dtype"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), "`b` must have dtype"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64), "`a` must have dtype"),
        (torch.zeros(()), torch.zeros(()), "`a` must have at least 1"),
        (torch.zeros(3, 0), torch.zeros(3, 0), "`a` has no features"),
    ],
)
def test_bad_input_names_the_argument(a, b, match):
    with pytest.raises(ValueError, match=match):
        ortho_subtract(a, b)


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -1.0, True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be a finite non-negative number"):
        ortho_subtract(torch.zeros(2, 3), torch.ones(2, 3), eps=eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_b_with_zero_eps_gives_a(backend, device):
    """b = 0 and eps = 0 (0/0 in the formula): the documented result is `a` itself, with finite gradients
    (da = g, db = 0), the same on every backend; the other rows are unaffected."""
    a, b = _inputs((3, 19), torch.float32, device, seed=4)
    b[1] = 0
    a, b = a.requires_grad_(), b.requires_grad_()
    out = ortho_subtract(a, b, eps=0.0, backend=backend)
    torch.testing.assert_close(out[1], a[1].detach(), atol=0, rtol=0)
    ref = ortho_subtract_reference(a.detach()[[0, 2]], b.detach()[[0, 2]], eps=0.0)
    assert_close(out[[0, 2]].detach(), ref, name="other rows")
    g = torch.randn(3, 19, generator=torch.Generator().manual_seed(5)).to(device)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    torch.testing.assert_close(ga[1], g[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(gb[1], torch.zeros_like(gb[1]), atol=0, rtol=0)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ortho_subtract(torch.zeros(2, 3), torch.zeros(2, 3), backend="fast")


def test_torch_compile_traces_triton_op_without_graph_break(device):
    import torch._dynamo

    torch._dynamo.reset()
    a, b = _inputs((5, 19), torch.float32, device)
    a.requires_grad_()

    def f(a, b):
        return ortho_subtract(a, b, backend="triton").square().sum()

    explain = torch._dynamo.explain(f)(a, b)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(a, b)
    (g,) = torch.autograd.grad(out, (a,))
    a2 = a.detach().clone().requires_grad_()
    ref = ortho_subtract_reference(a2, b).square().sum()
    (rg,) = torch.autograd.grad(ref, (a2,))
    assert_close(out.detach(), ref.detach(), name="compiled out")
    assert_close(g, rg, name="compiled grad")
