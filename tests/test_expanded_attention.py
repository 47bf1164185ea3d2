"""expanded_attention: Triton kernels (interpreted on CPU) against the PyTorch reference, forward and dq/dk/dv.

Tolerances (adaface.testing.tolerances): fp32 atol 1e-5 / rtol 1e-4 (both sides fp32, only summation order
differs); fp16 / bf16: at most 2× the error PyTorch makes running the reference in that dtype
(`upcast=False`), plus a floor of 4 ulp × the reference's scale. bf16 runs here through the kernel's fp32-cast
path (the interpreter's bf16 tl.dot is wrong); natively only on a GPU (tests marked `gpu`).
Every output buffer the kernels allocate is filled with NaN first (autouse fixture), so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adaface.kernels import expanded_attention as ek
from adaface.kernels._runtime import forced_tiles
from adaface.ops import expanded_attention, expanded_attention_reference
from adaface.testing.attention_inputs import (
    MODES,
    as_views,
    copies,
    make_leaves,
    make_masks,
    make_qkv,
    sdpa_composition,
)
from adaface.testing.scripts import load_script
from adaface.testing.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _nan_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    monkeypatch.setattr(ek, "_empty", _nan_empty)


@pytest.fixture
def force_blocks():
    with contextlib.ExitStack() as stack:

        def set_blocks(bl, bs):
            stack.enter_context(forced_tiles(ek, BLOCK_L=bl, BLOCK_S=bs))

        yield set_blocks


def _compare(
    device, B, H, L, S, D, E, mode, *, layout="contig", causal=False, mask="none", dtype=torch.float32,
    scale=None, logit_scale=1.0, seed=0, grad_atol=None,
):
    """Run the Triton op and the reference on the same inputs; compare the output and every input gradient."""
    leaves = make_leaves(
        B, H, L, S, D, E, mode, dtype=dtype, device=device, layout=layout, seed=seed, logit_scale=logit_scale
    )
    masks = make_masks(mask, B, H, L, S, device=device, seed=seed + 1)
    kw = dict(causal=causal, scale=scale, **masks)
    out = expanded_attention(*as_views(leaves, layout, E), backend="triton", **kw)
    leaves32 = tuple(t.detach().float().requires_grad_() for t in leaves)
    ref32 = expanded_attention_reference(*as_views(leaves32, layout, E), **kw)
    ref_lp, leaves_lp = None, None
    if dtype != torch.float32:
        leaves_lp = tuple(t.detach().clone().requires_grad_() for t in leaves)
        ref_lp = expanded_attention_reference(*as_views(leaves_lp, layout, E), upcast=False, **kw)
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    assert_close(out, ref32, ref_lp, name="out")

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref32, leaves32, g.float())
    lp_grads = torch.autograd.grad(ref_lp, leaves_lp, g) if ref_lp is not None else (None,) * 3
    for name, got, want, lp in zip(("dq", "dk", "dv"), grads, ref_grads, lp_grads):
        assert got.shape == want.shape
        assert_close(got, want, lp, name=name, atol=grad_atol)
    return out, grads


def _case(*, L, S, E, mode, B=1, H=1, D=32, layout="contig", causal=False, mask="none") -> tuple:
    """A row of CASES in test_matches_reference's parameter order; what a row leaves out takes the usual value."""
    return B, H, L, S, D, E, mode, layout, causal, mask


# Awkward shapes (odd L, S, S ≠ L, L/S not multiples of any tile), every mode, layouts, masks, causal.
CASES = [
    _case(H=2, L=77, S=77, D=64, E=3, mode="qv", layout="proj", causal=True, mask="kpm"),
    _case(B=2, L=5, S=33, E=2, mode="kv", mask="bool_b11s"),
    _case(H=2, L=33, S=5, E=3, mode="q", mask="float_bhls"),
    _case(B=2, H=2, L=17, S=17, E=8, mode="qkv", causal=True),
    _case(L=77, S=77, D=40, E=2, mode="k", layout="dstride", mask="bool_ls"),
    _case(H=2, L=20, S=45, D=128, E=2, mode="v", mask="kpm+float_ls"),
    _case(B=2, L=33, S=33, D=64, E=3, mode="qk", layout="expand", causal=True, mask="float_1h1s"),
    _case(L=9, S=70, E=1, mode="none", mask="kpm"),
    _case(H=3, L=24, S=24, E=3, mode="kv", layout="expand", mask="bool_bhl1"),
    _case(L=80, S=80, E=2, mode="qv", causal=True, mask="float_bhls"),
    _case(H=2, L=13, S=13, E=16, mode="qv", layout="expand", causal=True, mask="kpm"),
    _case(B=2, H=2, L=1, S=7, E=3, mode="qk", layout="proj"),
]


@pytest.mark.parametrize("B, H, L, S, D, E, mode, layout, causal, mask", CASES)
def test_matches_reference(B, H, L, S, D, E, mode, layout, causal, mask, device):
    _compare(device, B, H, L, S, D, E, mode, layout=layout, causal=causal, mask=mask)


@pytest.mark.parametrize("mode", MODES)
def test_every_shared_expanded_combination(mode, device):
    _compare(device, 2, 1, 13, 19, 32, 3, mode, mask="kpm", scale=0.3)


@pytest.mark.parametrize(
    "blocks, L, S, causal, mode",
    [
        ((16, 32), 77, 77, True, "qv"),
        ((32, 16), 45, 45, True, "kv"),
        ((32, 16), 45, 77, False, "q"),
        ((16, 16), 33, 33, True, "qkv"),
    ],
)
def test_multi_block_paths(blocks, L, S, causal, mode, force_blocks, device):
    """Tiles forced small: several L and S blocks, causal block skipping with BLOCK_L ≠ BLOCK_S."""
    force_blocks(*blocks)
    _compare(device, 1, 2, L, S, 32, 3, mode, causal=causal, mask="bool_ls")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_copies_on_the_dkdv_grid(mode, causal, force_blocks, device):
    """dK/dV runs one program per (S-block, copy): odd E, L, S and D, several S and L blocks; a shared k or v is
    the sum of its per-copy partials, an expanded one gets each copy's gradient."""
    force_blocks(16, 16)
    L, S = (37, 37) if causal else (29, 43)
    _compare(device, 2, 1, L, S, 21, 1 if mode == "none" else 5, mode, causal=causal, mask="kpm", seed=len(mode))


@pytest.mark.parametrize(
    "dtype, B, H, L, S, D, E, mode, causal, mask",
    [
        (torch.float16, 1, 2, 77, 77, 64, 4, "qv", True, "kpm"),
        (torch.float16, 2, 1, 21, 40, 32, 3, "kv", False, "float_bhls"),
        (torch.float16, 1, 1, 33, 33, 40, 2, "qkv", False, "bool_ls"),
        (torch.bfloat16, 1, 2, 45, 45, 64, 3, "qv", True, "kpm"),
        (torch.bfloat16, 2, 1, 19, 30, 32, 2, "k", False, "bool_b11s"),
    ],
)
def test_low_precision(dtype, B, H, L, S, D, E, mode, causal, mask, device):
    _compare(device, B, H, L, S, D, E, mode, causal=causal, mask=mask, dtype=dtype)


@pytest.mark.parametrize("causal, mask", [(False, "none"), (True, "none"), (False, "bool_ls"), (True, "float_bhls")])
def test_e1_matches_sdpa(causal, mask, device):
    B, H, L, S, D = 2, 2, 29, 29, 32
    leaves = make_leaves(B, H, L, S, D, 1, "none", device=device, seed=3)
    masks = make_masks(mask, B, H, L, S, device=device)
    out = expanded_attention(*leaves, causal=causal, backend="triton", **masks)
    sdpa_leaves = tuple(t.detach().clone().requires_grad_() for t in leaves)
    q, k, v = (t[:, :, :, 0] for t in sdpa_leaves)
    attn_mask = masks.get("attn_mask")
    if causal and attn_mask is not None:  # SDPA takes one or the other: fold the causal mask in
        tri = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        attn_mask = attn_mask.masked_fill(~tri, float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    assert_close(out, ref, name="out vs sdpa")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
    for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, sdpa_leaves, g)):
        assert_close(a, b, name=f"d{name} vs sdpa")


def test_fully_masked_rows_give_zeros_and_zero_grads(device):
    B, H, L, S, D, E = 2, 2, 19, 23, 32, 3
    leaves = make_leaves(B, H, L, S, D, E, "qv", device=device, seed=4)
    kpm = torch.ones(B, S, dtype=torch.bool, device=device)
    kpm[1] = False  # every row of batch 1 fully masked
    attn_mask = torch.ones(L, S, dtype=torch.bool, device=device)
    attn_mask[[0, 7, 18]] = False  # three rows fully masked in every batch
    out, (dq, dk, dv) = _compare_masked(device, leaves, E, kpm, attn_mask)
    assert (out[1] == 0).all() and (out[:, :, [0, 7, 18]] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dq[:, :, [0, 7, 18]] == 0).all()
    assert out[0, :, 1].abs().sum() > 0  # the other rows are not zeroed


def _compare_masked(device, leaves, E, kpm, attn_mask):
    out = expanded_attention(*leaves, key_padding_mask=kpm, attn_mask=attn_mask, backend="triton")
    leaves32 = tuple(t.detach().clone().requires_grad_() for t in leaves)
    ref = expanded_attention_reference(*leaves32, key_padding_mask=kpm, attn_mask=attn_mask)
    assert_close(out, ref, name="out")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = torch.autograd.grad(out, leaves, g)
    for name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves32, g)):
        assert_close(a, b, name=name)
    return out, grads


def test_fully_masked_rows_low_precision(device):
    leaves = make_leaves(1, 1, 9, 12, 32, 2, "kv", dtype=torch.float16, device=device, seed=6)
    kpm = torch.zeros(1, 12, dtype=torch.bool, device=device)
    out = expanded_attention(*leaves, key_padding_mask=kpm, backend="triton")
    assert (out == 0).all()
    out.float().sum().backward()
    assert all((t.grad == 0).all() for t in leaves)


def test_large_logits(device):
    """Logits of magnitude ~100: no overflow in the online softmax, gradients still match."""
    _compare(device, 1, 2, 33, 41, 32, 3, "qv", logit_scale=30.0, mask="kpm", grad_atol=1e-4)


def test_identical_copies_equal_single_copy(device):
    """Paper §2.2: E identical copies (expansion with noise ratio 0) compute exactly the E = 1 function."""
    B, H, L, D, E = 1, 2, 21, 32, 4
    leaves = make_leaves(B, H, L, L, D, 1, "none", device=device, seed=8)
    out_e = expanded_attention(*as_views(leaves, "expand", E), causal=True, backend="triton")
    grads_e = torch.autograd.grad(out_e.square().sum(), leaves)
    out_1 = expanded_attention(*leaves, causal=True, backend="triton")
    grads_1 = torch.autograd.grad(out_1.square().sum(), leaves)
    assert_close(out_e, out_1, name="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads_e, grads_1):
        assert_close(a, b, name=name)


def test_broadcast_output_grad_and_partial_requires_grad(device):
    """dO with stride 0 everywhere (from .sum()), and only k requiring grad."""
    q, k, v = make_leaves(1, 2, 15, 26, 32, 3, "qv", device=device, seed=9)
    q, v = q.detach(), v.detach()
    (dk,) = torch.autograd.grad(expanded_attention(q, k, v, backend="triton").sum(), (k,))
    k32 = k.detach().clone().requires_grad_()
    (rk,) = torch.autograd.grad(expanded_attention_reference(q, k32, v).sum(), (k32,))
    assert_close(dk, rk, name="dk")


def test_empty_query(device):
    q, k, v = make_leaves(1, 2, 0, 5, 32, 2, "qv", device=device)
    out = expanded_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 0, 32)
    out.sum().backward()
    assert (k.grad == 0).all() and (v.grad == 0).all()


@settings(max_examples=12, deadline=None)
@given(
    L=st.integers(1, 24), S=st.integers(1, 24), D=st.sampled_from([8, 16, 24, 32]), E=st.integers(1, 4),
    mode=st.sampled_from(MODES), causal=st.booleans(), mask=st.sampled_from(["none", "kpm", "float_bhls"]),
    seed=st.integers(0, 1000),
)
def test_property_random_shapes(L, S, D, E, mode, causal, mask, seed, device):
    if causal:
        S = L
    if mode == "none":
        E = 1
    _compare(device, 1, 2, L, S, D, E, mode, causal=causal, mask=mask, seed=seed)


def test_torch_compile_without_graph_break(device):
    import torch._dynamo

    torch._dynamo.reset()
    B, H, L, D, E = 1, 2, 17, 32, 3
    leaves = make_leaves(B, H, L, L, D, E, "qv", device=device, layout="proj", seed=10)
    kpm = make_masks("kpm", B, H, L, L, device=device)["key_padding_mask"]

    def f(q, k, v):
        q, k, v = as_views((q, k, v), "proj", E)
        return expanded_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="triton").square().sum()

    explain = torch._dynamo.explain(f)(*leaves)
    assert explain.graph_break_count == 0, explain.break_reasons
    out = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves32 = tuple(t.detach().clone().requires_grad_() for t in leaves)
    ref = expanded_attention_reference(
        *as_views(leaves32, "proj", E), causal=True, key_padding_mask=kpm
    ).square().sum()
    assert_close(out.detach(), ref.detach(), name="compiled out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves32)):
        assert_close(a, b, name=f"compiled {name}")


def _qkv(eq=2, ek_=1, ev=2, L=5, S=6, D=8, B=2, H=3):
    return torch.zeros(B, H, L, eq, D), torch.zeros(B, H, S, ek_, D), torch.zeros(B, H, S, ev, D)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(2, 3, 5, 8), *_qkv()[1:]), {}, "`q` must have 5 dimensions"),
        ((_qkv()[0], torch.zeros(2, 3, 6, 8), _qkv()[2]), {}, "`k` must have 5 dimensions"),
        (_qkv(eq=2, ek_=3, ev=1), {}, "copy dimensions"),
        ((_qkv()[0], torch.zeros(2, 3, 6, 1, 9), _qkv()[2]), {}, "`k` must have shape"),
        ((_qkv()[0], _qkv()[1], torch.zeros(2, 3, 7, 2, 8)), {}, "`v` must have shape"),
        (_qkv(), {"key_padding_mask": torch.ones(2, 7, dtype=torch.bool)}, "`key_padding_mask` must have shape"),
        (_qkv(), {"key_padding_mask": torch.ones(2, 6)}, "`key_padding_mask` must be a bool"),
        (_qkv(), {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}, "`attn_mask` of shape"),
        (_qkv(), {"attn_mask": torch.ones(2, 2, 3, 5, 6)}, "`attn_mask` of shape"),
        (_qkv(), {"attn_mask": torch.ones(5, 6, dtype=torch.int64)}, "`attn_mask` must be a bool or float"),
        (_qkv(), {"causal": True}, "`causal=True` needs L == S"),
        ((_qkv()[0], _qkv()[1].half(), _qkv()[2]), {}, "`k` has dtype"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expanded_attention(*args, backend="triton", **kwargs)


def test_kernel_entry_checks_bias():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="`bias`"):
        ek.expanded_attention_triton(q, k, v, torch.zeros(2, 3, 5, 6, dtype=torch.float16), False, 0.3)
    with pytest.raises(ValueError, match="`bias`"):
        ek.expanded_attention_triton(q, k, v, torch.zeros(2, 2, 5, 6), False, 0.3)
    with pytest.raises(ValueError, match="`scale`"):
        ek.expanded_attention_triton(q, k, v, None, False, float("nan"))


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_composition_baseline_is_exact(mode, device):
    """The benchmark's SDPA composition (concatenated / block-diagonal keys) computes the same function."""
    q, k, v = make_qkv(2, 2, 11, 11, 16, 3, mode, device=device, layout="proj", seed=11)
    ref = expanded_attention_reference(q, k, v, causal=True, scale=0.4)
    assert_close(sdpa_composition(q, k, v, causal=True, scale=0.4), ref, name=f"sdpa composition {mode}")


def test_copies_helper_matches_modes():
    assert copies("qv", 4) == (4, 1, 4) and copies("kv", 4) == (1, 4, 4) and copies("none", 4) == (1, 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["qv", "kv"])
def test_paper_scale_on_gpu(dtype, mode, device):
    """Native dtypes (bf16 tl.dot included) at the inverter's shapes: B·H = 48, L = S = 77, D = 64, E = 8."""
    _compare(device, 4, 12, 77, 77, 64, 8, mode, layout="proj", causal=True, mask="kpm", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_documented_maximum_shapes_on_gpu(dtype, device):
    """The largest documented tiles: D = 128 with E = 16 and L = S = 512, where shared memory is tightest."""
    _compare(device, 1, 2, 512, 512, 128, 16, "qv", layout="proj", causal=True, mask="kpm", dtype=dtype)
    _compare(device, 1, 2, 512, 512, 128, 16, "kv", layout="proj", causal=False, mask="kpm", dtype=dtype)


def test_bad_mask_device_scale_and_head_dim():
    q = torch.randn(1, 2, 5, 1, 8)
    with pytest.raises(ValueError, match="`scale` must be a finite number"):
        expanded_attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="`scale` must be a finite number"):
        expanded_attention(q, q, q, scale=True)
    with pytest.raises(ValueError, match="`scale` must be a finite number or None, got inf"):
        expanded_attention(q, q, q, scale=float("inf"))
    empty = torch.randn(1, 2, 5, 1, 0)
    with pytest.raises(ValueError, match="head dimension D"):
        expanded_attention(empty, empty, empty)
    meta_mask = torch.ones(1, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="`key_padding_mask` is on meta"):
        expanded_attention(q, q, q, key_padding_mask=meta_mask)
    with pytest.raises(ValueError, match="`attn_mask` is on meta"):
        expanded_attention(q, q, q, attn_mask=torch.zeros(5, 5, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_keys_is_a_clear_error(backend):
    """S = 0: every backend says so (the reference used to fail inside amax with an IndexError)."""
    q = torch.randn(1, 2, 5, 1, 8)
    k = torch.randn(1, 2, 0, 1, 8)
    with pytest.raises(ValueError, match=r"`k` and `v` must hold at least one key .* got S=0"):
        expanded_attention(q, k, k, backend=backend)


def test_fp32_dots_follow_allow_tf32():
    """fp32 inputs use TF32 dots (tensor-core tiles) only where torch allows TF32 matmuls, IEEE dots (smaller FMA
    tiles) otherwise; fp16 / bf16 tiles are the same either way."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ek._dot_flags(torch.float32)[1] == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert ek._dot_flags(torch.float32)[1] == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for kind in ("fwd", "dq", "dkdv"):
        ieee, tf32 = (ek.gpu_tiles(77, 77, 64, torch.float32, p, kind) for p in ("ieee", "tf32"))
        assert ieee["BLOCK_L"] * ieee["BLOCK_S"] < tf32["BLOCK_L"] * tf32["BLOCK_S"]
        assert ek.gpu_tiles(77, 77, 64, torch.float16, "tf32", kind) == ek.gpu_tiles(77, 77, 64, torch.float16,
                                                                                     "ieee", kind)


def _compile_check(records: list[dict], tmp_path, *args: str) -> subprocess.CompletedProcess:
    """tests/triton_compile_check.py compiling `records` (without the interpreter, as a user runs it)."""
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "tests/triton_compile_check.py", "--_compile", str(path), "--jobs", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True)


def _paper_records() -> list[dict]:
    """The expanded-attention configurations the compile check records at the paper's shapes."""
    check = load_script(ROOT / "tests" / "triton_compile_check.py")
    with check.recording() as records, check.cuda_choices():
        check.paper_attention()
    return [dict(rec, paper_shape=True) for rec in records.values()]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through Triton's interpreter")
def test_paper_shape_configurations_do_not_spill(tmp_path):
    """Every configuration the paper's shapes launch (fp32 IEEE, fp16, bf16) keeps its values in registers on sm_80
    and sm_90 (ptxas -v: 0 bytes of spill stores and loads)."""
    records = _paper_records()
    assert {r["kernel"] for r in records} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    run = _compile_check(records, tmp_path, "--arch", "80", "--arch", "90", "--fail-on-paper-spill")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"checked for spills: {2 * len(records)}, spilling: 0" in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through Triton's interpreter")
def test_compile_check_fails_on_a_paper_shape_spill(tmp_path):
    """An fp32 IEEE forward with 64 × 64 tiles spills: in a paper-shape row --fail-on-paper-spill fails and names
    the kernel, its configuration and the architecture; without the option, or outside the paper's shapes, it
    passes."""
    (fwd,) = [r for r in _paper_records() if r["kernel"] == "_fwd_kernel" and r["signature"]["Q"] == "*fp32"]
    fwd["constexprs"].update(BLOCK_L=64, BLOCK_S=64)
    run = _compile_check([fwd], tmp_path, "--arch", "90", "--fail-on-paper-spill")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("FAIL")]
    assert "FAIL sm_90 expanded_attention._fwd_kernel *fp32" in line and "'BLOCK_L': 64" in line
    assert "paper-shape configuration spills" in line and "registers" in line
    assert _compile_check([fwd], tmp_path, "--arch", "90").returncode == 0
    assert _compile_check([dict(fwd, paper_shape=False)], tmp_path, "--arch", "90",
                          "--fail-on-paper-spill").returncode == 0
