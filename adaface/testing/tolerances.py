"""Per-dtype tolerances for comparing kernels with their PyTorch references.

fp32: an absolute + relative bound (`FP32_ATOL`, `FP32_RTOL`): both sides compute in fp32 and differ
only by summation order.
fp16 / bf16 (flash-attention's rule): the kernel's error against an fp32 reference may be at most
`LOWP_FACTOR` times the error that PyTorch itself makes when it runs the same reference in that dtype,
plus a floor of a few units in the last place (`LOWP_FLOOR_ULPS` × the dtype's eps × the reference's
scale) so that a reference that happens to be exact does not demand an exact kernel.
"""

from __future__ import annotations

import torch

FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
LOWP_FACTOR = 2.0
LOWP_FLOOR_ULPS = 4.0


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def assert_close(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    *,
    name: str = "output",
    factor: float = LOWP_FACTOR,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Check `out` (any dtype) against `ref_fp32`; for fp16/bf16 `ref_lowp` is the reference run in that dtype."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values in the output"
    if out.dtype == torch.float32 or ref_lowp is None:
        torch.testing.assert_close(
            out.float(), ref_fp32.float(),
            atol=FP32_ATOL if atol is None else atol, rtol=FP32_RTOL if rtol is None else rtol,
            msg=lambda m: f"{name}: {m}",
        )
        return
    scale = max(ref_fp32.float().abs().max().item(), 1e-6) if ref_fp32.numel() else 1.0
    floor = LOWP_FLOOR_ULPS * torch.finfo(out.dtype).eps * scale + (atol or 0.0)
    ours = max_abs_err(out, ref_fp32)
    torch_err = max_abs_err(ref_lowp, ref_fp32)
    bound = factor * torch_err + floor
    assert ours <= bound, (
        f"{name} ({out.dtype}): max |err| {ours:.3e} > {factor}×PyTorch's own {torch_err:.3e} + floor {floor:.3e}"
    )
