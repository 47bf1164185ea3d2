"""Input builders for the compositional delta loss, shared by tests/test_delta_cosine.py and its benchmark.

The four tensors are (subj_single, subj_comp, cls_single, cls_comp), each of one shape `[..., C]`. With
`parallel=s` the composition features stay close to the single ones, as they do in training:
comp = single·(1 + s) + s·noise (the class side uses a different scale, 1 + 30·s, so the two deltas differ
in their parallel part too). `parallel=None` draws four independent Gaussians.
"""

from __future__ import annotations

import math

import torch

NAMES = ("subj_single", "subj_comp", "cls_single", "cls_comp")

# Paper-scale shapes (SD-1.5 at 512²): per-token rows over a 64² map at 1280/320 channels, and whole
# flattened 64²×320 feature maps as single rows.
PER_TOKEN_CUDA = (4, 4096, 1280)
PER_TOKEN_SMALL_C_CUDA = (4, 4096, 320)
LONG_ROW_CUDA = (4, 4096 * 320)


def delta_cosine_inputs(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    parallel: float | None = None,
    requires_grad: bool | tuple[bool, bool, bool, bool] = False,
    gen_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """[subj_single, subj_comp, cls_single, cls_comp], drawn on the CPU from `seed` in `gen_dtype`, then cast.

    `requires_grad` is one flag for all four or one per tensor. Drawing on the CPU means every device sees
    the same numbers; for benchmark-sized CUDA shapes use `cuda_inputs` (drawn on the device).
    """
    gen = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=gen_dtype)

    ss, cs = draw(), draw()
    if parallel is None:
        sc, cc = draw(), draw()
    else:
        sc = ss * (1 + parallel) + parallel * draw()
        cc = cs * (1 + 30 * parallel) + parallel * draw()
    flags = (requires_grad,) * 4 if isinstance(requires_grad, bool) else tuple(requires_grad)
    return [t.to(device=device, dtype=dtype).requires_grad_(f) for t, f in zip((ss, sc, cs, cc), flags)]


def cuda_inputs(
    shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, seed: int = 0, parallel: float = 1e-2,
    requires_grad: bool = False,
) -> list[torch.Tensor]:
    """Benchmark-sized inputs drawn directly on `device` (same recipe as `delta_cosine_inputs`)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    ss, cs = draw(), draw()
    sc = ss * (1 + parallel) + parallel * draw()
    cc = cs * (1 + 30 * parallel) + parallel * draw()
    return [t.requires_grad_(requires_grad) for t in (ss, sc, cs, cc)]


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, *, backward: bool, n_grads: int = 4) -> int:
    """Minimum HBM traffic of the fused op: the forward reads the four inputs once (and writes one fp32 per
    row); the backward reads them once more and writes `n_grads` gradients."""
    n = math.prod(shape)
    rows = n // shape[-1] if shape[-1] else 0
    elt = torch.empty((), dtype=dtype).element_size()
    total = 4 * n * elt + 4 * rows
    if backward:
        total += (4 + n_grads) * n * elt + 4 * rows
    return total
