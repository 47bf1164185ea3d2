"""soft_warp_loss: Triton kernels (interpreted on CPU) against the PyTorch reference, forward and gradients.

Tolerances (adaface.testing.tolerances): fp32 atol 1e-5 / rtol 1e-4; fp16 / bf16 at most 2× PyTorch's own error
in that dtype (reference run with upcast=False) plus a 4-ulp floor. Huge logits (|S| ~ 1e4) in fp32: either
implementation rounds S to ~|S|·2⁻²⁴ ≈ 6e-4, so the softmax and everything after it carries ~1e-3 relative
error: compared there with atol = rtol = 2e-3 × the reference's largest entry.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from adaface.kernels import soft_warp as K
from adaface.kernels._runtime import forced_tiles
from adaface.ops import soft_warp_loss, soft_warp_loss_reference
from adaface.ops.soft_warp import _mask_weights, soft_warp_rows_reference
from adaface.testing.soft_warp_inputs import make_inputs, make_mask
from adaface.testing.tolerances import assert_close

NAMES = ("q_subj", "q_comp", "feat_subj", "feat_comp")
SMALL = dict(K.TILE_KEYS)  # every tile at its least value (16; the forward's second pieces 0)


def _exact(dtype: torch.dtype) -> str:
    """fp32 inputs are compared at fp32 tolerances: exact fp32 dots (on a GPU "auto" picks tensor cores)."""
    return "ieee" if dtype == torch.float32 else "auto"


def _check(shape, dtype, device, mask_kind="none", *, scale=1.0, seed=0, huge=False, blocks=None, upstream=1.0):
    """Loss and all four gradients of the Triton op against the fp32 (and, for fp16/bf16, in-dtype) reference."""
    B, N, M, Dq, C = shape
    x = make_inputs(B, N, M, Dq, C, dtype=dtype, device=device, seed=seed, huge_logits=huge)
    mask = make_mask(mask_kind, B, N, device, torch.Generator().manual_seed(seed + 7))
    ins = [t.clone().requires_grad_() for t in x]
    with forced_tiles(K, **(blocks or {})):
        out = soft_warp_loss(*ins, mask, scale=scale, backend="triton", precision=_exact(dtype))
        grads = torch.autograd.grad(out * upstream, ins)
    r32 = [t.float().requires_grad_() for t in x]
    ref = soft_warp_loss_reference(*r32, mask, scale=scale)
    rgrads = torch.autograd.grad(ref * upstream, r32)
    lowp = dtype != torch.float32
    if lowp:
        rlp = [t.clone().requires_grad_() for t in x]
        ref_lp = soft_warp_loss_reference(*rlp, mask, scale=scale, upcast=False)
        lgrads = torch.autograd.grad(ref_lp * upstream, rlp)
    assert out.dtype == torch.float32 and out.shape == ()
    tol = {}
    if huge and not lowp:
        tol = lambda r: dict(atol=2e-3 * r.abs().max().item(), rtol=2e-3)  # noqa: E731
    else:
        tol = lambda r: {}  # noqa: E731
    assert_close(out, ref, ref_lp.float() if lowp else None, name="loss", **tol(ref))
    for name, gr, rg, i in zip(NAMES, grads, rgrads, range(4)):
        assert gr.dtype == dtype
        assert_close(gr, rg, lgrads[i] if lowp else None, name=f"grad {name}", **tol(rg))
    return out, grads


SHAPES = [  # (B, N, M, Dq, C): N, M not multiples of the blocks; Dq, C odd
    (1, 1, 1, 1, 1),
    (2, 5, 33, 7, 9),
    (1, 33, 70, 19, 37),
    (2, 70, 5, 24, 3),
    (1, 40, 129, 130, 13),  # Dq > one interpreter block (128): the Dq loop and the Dq output split run
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grads_match_reference(shape, dtype, device):
    _check(shape, dtype, device, "bool", scale=1.0 if shape[0] == 1 else 0.37, seed=sum(shape))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "ones"])
def test_mask_kinds(mask_kind, device):
    _check((2, 33, 40, 11, 17), torch.float32, device, mask_kind, seed=3)


def test_small_blocks_force_every_split(device):
    """16-wide tiles: several row/column blocks, a Dq loop and C loop of 3 chunks, output split in 3 chunks."""
    _check((2, 37, 45, 41, 35), torch.float32, device, "bool", blocks=SMALL, seed=5, upstream=3.0)


def test_small_blocks_fp16(device):
    _check((1, 21, 35, 33, 40), torch.float16, device, "float", blocks=SMALL, seed=6)


def test_bf16_through_fp32_cast_path(device):
    _check((1, 19, 26, 13, 21), torch.bfloat16, device, "bool", seed=8)


@pytest.mark.gpu
def test_bf16_native_dot_gpu(device):
    _check((2, 300, 257, 320, 200), torch.bfloat16, device, "bool", seed=9)
    _check((1, 64, 64, 1280, 1280), torch.bfloat16, device, "none", seed=10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_widest_features_on_gpu(dtype, device):
    """Dq = C = 1280 (the 8x8 maps) in every dtype, where the feature tiles are largest, at a long M."""
    _check((2, 64, 4096, 1280, 1280), dtype, device, "bool", seed=13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits_no_overflow(dtype, device):
    x = make_inputs(1, 8, 8, 19, 4, huge_logits=True)
    s = torch.einsum("bnd,bmd->bnm", x[0], x[1])
    assert s.abs().max() > 5e3  # the inputs really are in the 1e4 regime
    out, grads = _check((2, 33, 70, 19, 37), dtype, device, "bool", huge=True, seed=11)
    assert torch.isfinite(out) and all(torch.isfinite(g.float()).all() for g in grads)


def test_huge_logits_small_blocks(device):
    _check((1, 20, 37, 19, 18), torch.float32, device, "none", huge=True, blocks=SMALL, seed=12)


def test_all_zero_mask_gives_zero_loss_and_zero_grads(device):
    x = make_inputs(2, 9, 13, 5, 7, device=device)
    ins = [t.clone().requires_grad_() for t in x]
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    out = soft_warp_loss(*ins, mask, backend="triton", precision="ieee")
    assert out.item() == 0.0 and out.requires_grad
    grads = torch.autograd.grad(out, ins)
    for name, g in zip(NAMES, grads):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_rows_per_row_values_and_unselected_rows_are_untouched(device):
    """Per-row losses match; unselected rows return exactly 0, and NaN in their inputs reaches nothing."""
    B, N, M, Dq, C = 2, 23, 30, 9, 14
    x = list(make_inputs(B, N, M, Dq, C, device=device, seed=13))
    mask = make_mask("bool", B, N, device, torch.Generator().manual_seed(1))
    w = _mask_weights(mask, B, N, device)
    ref_rows = torch.where(w != 0, soft_warp_rows_reference(*x), 0.0)
    x[0] = torch.where(mask[..., None], x[0], float("nan"))
    x[2] = torch.where(mask[..., None], x[2], float("nan"))
    ins = [t.clone().requires_grad_() for t in x]
    rows = K.soft_warp_rows_triton(*ins, w, 1.0, "ieee")
    assert_close(rows, ref_rows, name="rows")
    assert torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    grads = torch.autograd.grad((rows * torch.linspace(0.5, 2, N)).sum(), ins)
    for name, g in zip(NAMES, grads):
        assert torch.isfinite(g).all(), name
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    assert torch.equal(grads[2][~mask], torch.zeros_like(grads[2][~mask]))


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (3,), (1, 3)])
def test_only_some_inputs_require_grad(which, device):
    x = make_inputs(1, 17, 21, 6, 10, device=device, seed=14)
    ins = [t.clone().requires_grad_(i in which) for i, t in enumerate(x)]
    out = soft_warp_loss(*ins, backend="triton", precision="ieee")
    grads = torch.autograd.grad(out, [ins[i] for i in which])
    r32 = [t.clone().requires_grad_(i in which) for i, t in enumerate(x)]
    rgrads = torch.autograd.grad(soft_warp_loss_reference(*r32), [r32[i] for i in which])
    for i, g, rg in zip(which, grads, rgrads):
        assert_close(g, rg, name=f"grad {NAMES[i]}")


def test_backward_skips_kernels_for_inputs_without_grad(device, monkeypatch):
    calls = []
    for kname in ("_bwd_prep_kernel", "_bwd_dq_kernel", "_bwd_col_kernel"):
        kernel = getattr(K, kname)

        class Spy:
            def __init__(self, kernel, kname):
                self.kernel, self.kname = kernel, kname

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    calls.append((self.kname, kw.get("NEED_DK"), kw.get("NEED_DV")))
                    return self.kernel[grid](*args, **kw)
                return launch

        monkeypatch.setattr(K, kname, Spy(kernel, kname))
    x = make_inputs(1, 9, 11, 5, 6, device=device)
    fs = x[2].clone().requires_grad_()
    (g,) = torch.autograd.grad(soft_warp_loss(x[0], x[1], fs, x[3], backend="triton"), (fs,))
    assert calls == [("_bwd_prep_kernel", None, None)]
    calls.clear()
    fc = x[3].clone().requires_grad_()
    torch.autograd.grad(soft_warp_loss(x[0], x[1], x[2], fc, backend="triton"), (fc,))
    assert calls == [("_bwd_prep_kernel", None, None), ("_bwd_col_kernel", False, True)]
    calls.clear()
    qc = x[1].clone().requires_grad_()
    torch.autograd.grad(soft_warp_loss(x[0], qc, x[2], x[3], backend="triton"), (qc,))
    assert calls == [("_bwd_prep_kernel", None, None), ("_bwd_col_kernel", True, False)]


def test_no_grad_inputs_forward_only(device):
    x = make_inputs(2, 12, 9, 4, 5, device=device, seed=15)
    out = soft_warp_loss(*x, backend="triton")
    assert not out.requires_grad
    assert_close(out, soft_warp_loss_reference(*x), name="loss")


def test_nan_filled_output_buffers(device, monkeypatch):
    """Every fresh buffer starts as NaN: an element a kernel forgets to write would show in loss or grads."""
    def nan_empty(*a, **kw):
        return torch.empty(*a, **kw).fill_(float("nan"))

    def nan_empty_like(t, **kw):
        return torch.empty_like(t, **kw).fill_(float("nan"))

    monkeypatch.setattr(K, "_empty", nan_empty)
    monkeypatch.setattr(K, "_empty_like", nan_empty_like)
    _check((2, 37, 45, 41, 35), torch.float32, device, "bool", blocks=SMALL, seed=16)
    _check((2, 9, 13, 5, 7), torch.float16, device, "zeros", seed=17)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2), N=st.integers(1, 40), M=st.integers(1, 40), Dq=st.integers(1, 24),
    C=st.integers(1, 24), p=st.sampled_from([0.0, 0.3, 1.0]), scale=st.sampled_from([1.0, 0.5, -0.25]),
    seed=st.integers(0, 1000),
)
def test_property_random_shapes(B, N, M, Dq, C, p, scale, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = make_inputs(B, N, M, Dq, C, device=device, seed=seed)
    mask = make_mask("bool", B, N, device, torch.Generator().manual_seed(seed), p=p)
    ins = [t.clone().requires_grad_() for t in x]
    out = soft_warp_loss(*ins, mask, scale=scale, backend="triton", precision="ieee")
    grads = torch.autograd.grad(out, ins)
    r32 = [t.clone().requires_grad_() for t in x]
    ref = soft_warp_loss_reference(*r32, mask, scale=scale)
    rgrads = torch.autograd.grad(ref, r32)
    assert_close(out, ref, name="loss")
    for name, g, rg in zip(NAMES, grads, rgrads):
        assert_close(g, rg, name=f"grad {name}")


def test_torch_compile_without_graph_break(device):
    import torch._dynamo

    torch._dynamo.reset()
    x = make_inputs(2, 13, 17, 6, 9, device=device, seed=18)
    mask = make_mask("bool", 2, 13, device, torch.Generator().manual_seed(2))
    qs, fc = x[0].clone().requires_grad_(), x[3].clone().requires_grad_()

    def f(qs, qc, fs, fc, mask):
        return soft_warp_loss(qs, qc, fs, fc, mask, backend="triton") * 2.0

    explain = torch._dynamo.explain(f)(qs, x[1], x[2], fc, mask)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(qs, x[1], x[2], fc, mask)
    g_qs, g_fc = torch.autograd.grad(out, (qs, fc))
    r_qs, r_fc = x[0].clone().requires_grad_(), x[3].clone().requires_grad_()
    ref = soft_warp_loss_reference(r_qs, x[1], x[2], r_fc, mask) * 2.0
    rg_qs, rg_fc = torch.autograd.grad(ref, (r_qs, r_fc))
    assert_close(out.detach(), ref.detach(), name="compiled loss")
    assert_close(g_qs, rg_qs, name="compiled grad q_subj")
    assert_close(g_fc, rg_fc, name="compiled grad feat_comp")


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((_zeros(2, 3), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {}, "`q_subj` must have 3 dimensions"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 6), _zeros(2, 3, 6), _zeros(2, 4, 6)), {}, "`q_comp` must have shape"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 7), _zeros(2, 4, 6)), {}, "`feat_comp` must have shape"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 2, 6), _zeros(2, 4, 6)), {}, "`feat_subj` must have shape"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5, dtype=torch.float16), _zeros(2, 3, 6), _zeros(2, 4, 6)), {},
         "`q_comp` has dtype"),
        ((_zeros(2, 3, 5, dtype=torch.int32),) * 4, {}, "`q_subj` must have dtype"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6), _zeros(2, 4)), {},
         r"`mask` must have shape \[B, N\]"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6), _zeros(3, dtype=torch.bool)), {},
         r"`mask` must have shape \[B, N\]"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6),
          torch.zeros(2, 3, dtype=torch.int64)), {}, "`mask` must be bool or float"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {"scale": "1"}, "`scale`"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {"scale": float("nan")},
         "`scale` must be a finite number, got nan"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {"scale": float("inf")},
         "`scale` must be a finite number, got inf"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {"scale": True},
         "`scale` must be a finite number, got True"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6),
          torch.tensor([[1.0, -0.5, 0.0], [1.0, 1.0, 1.0]])), {}, "`mask` must hold finite non-negative row weights"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6),
          torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 1.0]])), {}, "`mask` must hold finite non-negative"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6),
          torch.tensor([[1.0, float("inf"), 0.0], [1.0, 1.0, 1.0]])), {}, "`mask` must hold finite non-negative"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 6), _zeros(2, 4, 6)), {"backend": "fast"},
         "backend must be one of"),
        ((_zeros(2, 3, 5), _zeros(2, 0, 5), _zeros(2, 3, 6), _zeros(2, 0, 6)), {}, "`q_comp` has no keys"),
        ((_zeros(2, 3, 0), _zeros(2, 4, 0), _zeros(2, 3, 6), _zeros(2, 4, 6)), {}, "`q_subj` has no query features"),
        ((_zeros(2, 3, 5), _zeros(2, 4, 5), _zeros(2, 3, 0), _zeros(2, 4, 0)), {}, "`feat_subj` has no features"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_warp_loss(*args, **kwargs)


def test_forced_tiles_rejects_bad_tiles():
    with pytest.raises(ValueError, match="power of two"):
        with forced_tiles(K, BWD_BLOCK_N=24):
            pass
    with pytest.raises(ValueError, match="power of two >= 16"):
        with forced_tiles(K, BWD_BLOCK_N=8):
            pass
    with pytest.raises(ValueError, match="unknown tile 'BLOCK_Q'"):
        with forced_tiles(K, BLOCK_Q=16):
            pass


def test_log2e():
    assert math.isclose(K.LOG2E, 1 / math.log(2))


# ---------------------------------------------------------------------------------------------------------
# the forward's plans (kernels/soft_warp.py `_fwd_plan`): each forced at small odd shapes, 16-row/key blocks,
# forward (per-row losses) and gradients against the float64 reference at fp32 tolerances

FWD_PATHS = {  # name: ((B, N, M, Dq, C), forced FWD_ tiles)
    # q resident in one piece, the output in one piece wider than C
    "one_piece": ((2, 19, 23, 13, 40), dict(FWD_D0=16, FWD_D1=0, FWD_C0=64, FWD_C1=0)),
    # q resident in two pieces (41 = 32 + 9), C = 72 = 64 + 16 in one program
    "two_pieces_72": ((2, 21, 37, 41, 72), dict(FWD_D0=32, FWD_D1=16, FWD_C0=64, FWD_C1=16)),
    # C = 328 in 256 + 128, q streamed in three 16-wide chunks
    "two_pieces_328": ((1, 17, 19, 35, 328), dict(FWD_D0=16, FWD_D1=0, FWD_C0=256, FWD_C1=128)),
    # chunks of 16 + 16 columns: C = 72 in three programs, the last one's second piece wholly past C
    "chunked_72": ((2, 21, 37, 41, 72), dict(FWD_D0=16, FWD_D1=0, FWD_C0=16, FWD_C1=16)),
    # chunks of 128 + 32 columns: C = 328 in three programs, q resident in 16 + 16 (Dq = 19)
    "chunked_328": ((1, 17, 19, 19, 328), dict(FWD_D0=16, FWD_D1=16, FWD_C0=128, FWD_C1=32)),
}
ROW_MASKS = ("zeros", "one", "ones")  # rows selected: none, one (batch 0 only), all


def _row_mask(kind: str, B: int, N: int, device) -> torch.Tensor:
    if kind == "one":
        mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        mask[0, N // 2] = True
        return mask
    return make_mask(kind, B, N, device)


@pytest.mark.parametrize("mask_kind", ROW_MASKS)
@pytest.mark.parametrize("path", list(FWD_PATHS))
def test_forward_plans_against_float64(path, mask_kind, device):
    (B, N, M, Dq, C), fwd = FWD_PATHS[path]
    x = make_inputs(B, N, M, Dq, C, device=device, seed=N + Dq + C)
    mask = _row_mask(mask_kind, B, N, device)
    w = _mask_weights(mask, B, N, device)
    ins = [t.clone().requires_grad_() for t in x]
    with forced_tiles(K, FWD_BLOCK_N=16, FWD_BLOCK_M=16, **fwd):
        rows = K.soft_warp_rows_triton(*ins, w, 0.6, "ieee")
        grads = torch.autograd.grad((rows * torch.linspace(0.5, 2.0, N, device=device)).sum(), ins)
    r64 = [t.double().requires_grad_() for t in x]
    ref = torch.where(w != 0, soft_warp_rows_reference(*r64, scale=0.6), 0.0)
    rgrads = torch.autograd.grad((ref * torch.linspace(0.5, 2.0, N, device=device, dtype=torch.float64)).sum(), r64)
    assert_close(rows, ref.float(), name="rows")
    assert torch.equal(rows[w == 0], torch.zeros_like(rows[w == 0]))
    for name, g, rg in zip(NAMES, grads, rgrads):
        assert_close(g, rg.float(), name=f"grad {name}")


def test_forward_huge_logits_two_pieces(device):
    """|S| ~ 1e4 through the resident two-piece q and a two-piece output: the scores the backward recomputes
    (over the same 16-wide Dq chunks, as these forced tiles make them) must be the forward's to the last bit for its
    softmax to match."""
    blocks = dict(SMALL, FWD_D0=16, FWD_D1=16, FWD_C0=16, FWD_C1=16)
    _check((1, 20, 37, 19, 40), torch.float32, device, "bool", huge=True, blocks=blocks, seed=23)


def test_cover_and_plan():
    assert [K._cover(n) for n in (1, 16, 17, 48, 72, 100, 320, 328, 640)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (64, 16), (128, 0), (256, 64), (256, 128), (512, 128)]
    units = {}  # modelled matmul work per row and key: ⌈C / W⌉ · (Dq padded + W)
    for precision, elem in (("bf16", 2), ("bf16", 4), ("tf32", 4), ("ieee", 4)):
        for dim in (320, 640, 1280):
            plan = K.gpu_tiles(4096, 4096, dim, dim, precision=precision, elem=elem)
            d0, d1, c0, c1 = K._fwd_pieces(plan)
            resident = dim <= d0 + d1
            width = c0 + c1
            op = K._OPERAND_BYTES[precision]
            words = width / 8 + (d0 + d1) * op / 8 * resident + plan["FWD_BLOCK_M"] * width * op / 512
            assert words <= K.FWD_WORDS
            assert plan["FWD_BLOCK_M"] * ((d0 + d1 if resident else d0) + width) * elem <= K.FWD_STAGE_BYTES
            units[precision, elem, dim] = math.ceil(dim / width) * ((d0 + d1 if resident else dim) + width)
    # SD-1.5's 64² layers (320 features) in one program per row block; 32² (640) too, but for "ieee"
    assert all(units[p, e, 320] == 640 for p, e in (("bf16", 2), ("bf16", 4), ("tf32", 4), ("ieee", 4)))
    assert units["bf16", 2, 640] == units["tf32", 4, 640] == 1280
    assert units["bf16", 2, 1280] == units["tf32", 4, 1280] == 3840  # two 640-wide chunks
    with pytest.raises(ValueError, match="FWD_C1"):
        K._fwd_pieces(dict(FWD_D0=16, FWD_D1=0, FWD_C0=16, FWD_C1=8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_soft_mask_is_a_weighted_mean(backend, device):
    """A soft (fractional) face mask weights rows: scaling it changes nothing, and it matches Σw·row / Σw."""
    ins = make_inputs(2, 9, 11, 8, 6, seed=3, device=device)
    w = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)).to(device) * 0.05  # Σw < 1
    loss = soft_warp_loss(*ins, w, backend=backend, precision="ieee")
    scaled = soft_warp_loss(*ins, w * 40.0, backend=backend, precision="ieee")
    rows = soft_warp_rows_reference(*ins)
    expected = (rows * w).sum() / w.sum()
    assert_close(loss, expected, name="soft-mask loss")
    assert_close(scaled, expected, name="scaled soft-mask loss")


# ---------------------------------------------------------------------------------------------------------
# precision: the matmul operands' precision against a float64 reference
#
# Error measure: max |got − ref| / max |ref| per output (loss, each gradient). Bounds, from the operands' unit
# roundoff u (fp32 2⁻²⁴, TF32 and fp16 2⁻¹¹, bf16 2⁻⁹) times a margin for sums of ~Dq, M terms and the
# softmax's amplification: ieee 1e-4, tf32 / fp16 1e-2, bf16 4e-2. Under TRITON_INTERPRET=1 the TF32 dot
# computes in fp32 and bf16 tiles are cast to fp32 (the interpreter's bf16 dot is wrong), so on the CPU those
# two are checked for their plumbing at their own (looser) bound; fp16 rounds its operands here too.
PRECISION_BOUND = {"ieee": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 4e-2}


def _precision_errors(precision, device, blocks=None):
    B, N, M, Dq, C = 2, 21, 30, 19, 27
    x = make_inputs(B, N, M, Dq, C, device=device, seed=21)
    mask = make_mask("bool", B, N, device, torch.Generator().manual_seed(22))
    ins = [t.clone().requires_grad_() for t in x]
    with forced_tiles(K, **(blocks or {})):
        out = soft_warp_loss(*ins, mask, backend="triton", precision=precision)
        grads = torch.autograd.grad(out, ins)
    r64 = [t.double().requires_grad_() for t in x]
    ref = soft_warp_loss_reference(*r64, mask, upcast=False)
    rgrads = torch.autograd.grad(ref, r64)
    pairs = [("loss", out, ref)] + [(f"grad {n}", g, rg) for n, g, rg in zip(NAMES, grads, rgrads)]
    return {name: ((got.double() - want).abs().max() / want.abs().max()).item() for name, got, want in pairs}


@pytest.mark.parametrize("precision", list(PRECISION_BOUND))
def test_precision_against_float64(precision, device):
    errors = _precision_errors(precision, device)
    bound = PRECISION_BOUND[precision]
    assert all(e <= bound for e in errors.values()), f"{precision}: relative errors {errors} over {bound}"


def test_fp16_precision_rounds_the_operands(device):
    """fp32 inputs with precision fp16 really compute in fp16: their error is far above exact fp32's."""
    exact, half = _precision_errors("ieee", device), _precision_errors("fp16", device, blocks=SMALL)
    assert max(half.values()) > 20 * max(exact.values()), (exact, half)


def test_auto_precision_resolution():
    from adaface.ops.soft_warp import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", torch.float32, cpu) == "ieee"
    assert resolve_precision("auto", torch.bfloat16, cuda) == "bf16"
    assert resolve_precision("auto", torch.float16, cpu) == "fp16"
    assert resolve_precision("tf32", torch.float16, cpu) == "tf32"
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert resolve_precision("auto", torch.float32, cuda) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        want = {torch.float16: "fp16", torch.bfloat16: "bf16"}[torch.get_autocast_dtype("cuda")]
        assert resolve_precision("auto", torch.float32, cuda) == want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("backend, precision, match", [
    ("triton", "fp64", r"`precision` must be one of"),
    ("torch", "tf32", r"`precision` 'tf32' needs backend 'triton'"),
])
def test_bad_precision_names_the_argument(backend, precision, match, device):
    x = make_inputs(1, 3, 4, 5, 6, device=device)
    with pytest.raises(ValueError, match=match):
        soft_warp_loss(*x, backend=backend, precision=precision)


# ---------------------------------------------------------------------------------------------------------
# backward code paths (kernels/soft_warp.py `bwd_pieces`): output columns owned as one or two power-of-two
# pieces, or split into chunks; 16-wide steps cross several row / key / contraction blocks. Gradients against
# the float64 reference at the "ieee" bound of PRECISION_BOUND.
STEPS16 = dict(BWD_BLOCK_N=16, BWD_BLOCK_M=16, BWD_DQ_BLOCK_N=16, BWD_DQ_BLOCK_M=16, BWD_BLOCK_D=16, BWD_BLOCK_C=16)


def _mask_selecting(counts, N, device):
    """Bool mask [len(counts), N]: batch b selects counts[b] rows, spread over the rows."""
    mask = torch.zeros(len(counts), N, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.linspace(N - 1, 0, c).round().long()] = True
    return mask.to(device)


def _bwd_errors(shape, counts, needs, blocks, device, seed=31):
    """Relative errors (max |got − ref| / max |ref|) of the needed gradients against float64; also asserts that
    q_subj's and feat_subj's gradients are exactly 0 at unselected rows."""
    B, N, M, Dq, C = shape
    x = make_inputs(B, N, M, Dq, C, device=device, seed=seed)
    mask = _mask_selecting(counts, N, device)
    ins = [t.clone().requires_grad_(n) for t, n in zip(x, needs)]
    with forced_tiles(K, **blocks):
        grads = torch.autograd.grad(soft_warp_loss(*ins, mask, backend="triton", precision="ieee"),
                                    [t for t in ins if t.requires_grad])
    r64 = [t.double().requires_grad_(n) for t, n in zip(x, needs)]
    ref = soft_warp_loss_reference(*r64, mask, upcast=False)
    rgrads = torch.autograd.grad(ref, [t for t in r64 if t.requires_grad])
    names = [n for n, need in zip(NAMES, needs) if need]
    for name, g in zip(names, grads):
        if name in ("q_subj", "feat_subj"):
            assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), name
    return {name: ((g.double() - rg).abs().max() / rg.abs().max().clamp_min(1e-300)).item()
            for name, g, rg in zip(names, grads, rgrads)}


BWD_PATHS = {  # (B, N, M, Dq, C), forced tiles, the pieces / chunks they make
    "one_piece": ((2, 21, 19, 24, 64), {}),  # 24 → (32, 0), 64 → (64, 0)
    "two_pieces": ((2, 19, 23, 72, 80), {}),  # 72, 80 → (64, 16): one chunk
    "two_pieces_16_steps": ((2, 37, 35, 72, 80), STEPS16),  # several row, key and Dq / C blocks
    "chunks_328": ((1, 17, 21, 72, 328), dict(STEPS16, BWD_OUT=64)),  # 5 chunks: dq 5 × 16, C 5 × (64 + 16)
    "chunks_unequal": ((2, 18, 20, 20, 72), dict(STEPS16, BWD_OUT=16)),  # 5 chunks of C, 2 of Dq (3 idle)
}


@pytest.mark.parametrize("path", list(BWD_PATHS))
def test_backward_paths_against_float64(path, device):
    shape, blocks = BWD_PATHS[path]
    B, N = shape[:2]
    counts = [N, 5][:B]  # every row, and some
    errors = _bwd_errors(shape, counts, (True,) * 4, blocks, device)
    assert all(e <= PRECISION_BOUND["ieee"] for e in errors.values()), f"{path}: relative errors {errors}"


def test_backward_pieces_and_chunks():
    assert K.bwd_pieces(320, 320, 256) == ((256, 64), (256, 64))  # the paper: one program owns every column
    assert K.bwd_pieces(640, 640, 256) == ((256, 64), (256, 64))  # two chunks of 320
    assert K.bwd_pieces(1280, 1280, 256) == ((256, 64), (256, 64))  # four
    assert K.bwd_pieces(72, 328, 64) == ((16, 0), (64, 16))  # five chunks, dq's of 16 columns
    assert K.bwd_pieces(24, 8, 256) == ((32, 0), (16, 0))
    widths = (1, 5, 24, 72, 130, 320, 328, 600, 640, 1000, 1280)
    for Dq, C, cap in itertools.product(widths, widths, (16, 64, 256)):
        pd, pc = K.bwd_pieces(Dq, C, cap)
        limit = cap + cap // 4
        assert sum(pd) <= limit and sum(pc) <= limit, (Dq, C, cap, pd, pc)
        n = max(triton.cdiv(Dq, sum(pd)), triton.cdiv(C, sum(pc)))  # the chunks launched
        if n > 1:  # fewer chunks would not fit
            assert max(sum(K._cover(triton.cdiv(Dq, n - 1))), sum(K._cover(triton.cdiv(C, n - 1)))) > limit


@pytest.mark.parametrize("counts", [(0, 1), (1, 0), (0, 0), (14, 14)], ids=lambda c: f"rows_{c[0]}_{c[1]}")
def test_backward_masks_selecting_0_1_all_rows(counts, device):
    """A batch with no selected row (its column programs loop zero times and store zeros), one row, all rows."""
    if counts == (0, 0):  # the masked mean of no rows is 0 with zero gradients (its own test): nothing to compare
        x = [t.requires_grad_() for t in make_inputs(2, 14, 9, 72, 80, device=device)]
        grads = torch.autograd.grad(soft_warp_loss(*x, _mask_selecting(counts, 14, device), backend="triton",
                                                   precision="ieee"), x)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        return
    errors = _bwd_errors((2, 14, 9, 72, 80), list(counts), (True,) * 4, STEPS16, device)
    assert all(e <= PRECISION_BOUND["ieee"] for e in errors.values()), f"{counts}: relative errors {errors}"


@pytest.mark.parametrize("needs", [n for n in itertools.product((False, True), repeat=4) if any(n)],
                         ids=lambda n: "".join("x" if v else "_" for v in n))
def test_backward_every_subset_of_needed_grads(needs, device):
    """dq_comp alone (dP, no dfeat_comp accumulator), dfeat_comp alone (no dP), both, with chunks of unequal
    counts (dq's 2, dfeat_comp's 5), and dq_subj / feat_subj with or without them."""
    errors = _bwd_errors((2, 18, 20, 20, 72), [18, 7], needs, dict(STEPS16, BWD_OUT=16), device)
    assert all(e <= PRECISION_BOUND["ieee"] for e in errors.values()), f"{needs}: relative errors {errors}"
