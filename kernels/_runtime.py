"""What the kernel modules share: whether Triton runs interpreted, torch's cosine eps, and how tiles are chosen.

Tiles. Every kernel module's launchers take their launch configuration (tile sizes, warps, stages) from one
module-level function, `tiles(...)`, looked up at call time. At import it is the module's `gpu_tiles` (what
CUDA launches) or, under TRITON_INTERPRET=1, its `interpreter_tiles` (few, large programs: the interpreter's
cost is per program and per op, not per element); Triton itself decides at import (`triton.jit`) whether a
kernel is interpreted, so the choice is made once. The launch path holds no test hook: tests and
tests/triton_compile_check.py change what the launchers choose only by swapping `tiles` with the context
managers below (`gpu_tiles`: the CUDA choice also under the interpreter; `forced_tiles`: some tile sizes fixed,
so multi-block and split paths run at small shapes).

This module imports neither triton nor adaface.ops: adaface.ops imports it (dependencies point down).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

# torch.nn.functional.cosine_similarity's default eps, used by the cosine of both losses and their references
COSINE_EPS = 1e-8

TilePolicy = Callable[..., dict[str, int]]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def policy_for_this_process(gpu: TilePolicy, interpreter: TilePolicy) -> TilePolicy:
    """The tile policy a kernel module starts with (its `tiles`)."""
    return interpreter if interpreting() else gpu


@contextlib.contextmanager
def use_tiles(module: ModuleType, policy: TilePolicy) -> Iterator[None]:
    """Within the block, the launchers of kernel module `module` take their configuration from `policy`."""
    old = module.tiles
    module.tiles = policy
    try:
        yield
    finally:
        module.tiles = old


@contextlib.contextmanager
def gpu_tiles(*modules: ModuleType) -> Iterator[None]:
    """Within the block, the launchers of `modules` choose exactly what they choose on CUDA (tiles, chunks,
    warps, stages), also under the interpreter: how the GPU configurations are executed on a CPU."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(use_tiles(module, module.gpu_tiles))
        yield


@contextlib.contextmanager
def forced_tiles(module: ModuleType, **fixed: int) -> Iterator[None]:
    """Within the block, `module`'s launchers use the tile sizes in `fixed` on top of their current choice.

    Allowed names and their minimum are the module's `TILE_KEYS`; every value must be a power of two.
    """
    for name, value in fixed.items():
        if name not in module.TILE_KEYS:
            raise ValueError(f"{module.__name__}: unknown tile {name!r} (tiles: {sorted(module.TILE_KEYS)})")
        low = module.TILE_KEYS[name]
        if not isinstance(value, int) or value < low or value & (value - 1):
            raise ValueError(f"{module.__name__}: tile {name} must be a power of two >= {low}, got {value!r}")
    base = module.tiles

    def policy(*sizes, **kw) -> dict[str, int]:
        return {**base(*sizes, **kw), **fixed}

    with use_tiles(module, policy):
        yield


def soft_warp_saved_state_like(q_subj, feat_comp) -> tuple:
    """Empty tensors shaped as the soft-warp forward's saved state (rows, warped, lse2 in fp32; order, count in
    int32), which every backend returns: what the forward ops' `register_fake` give torch.compile."""
    import torch

    B, N = q_subj.shape[:2]
    C = feat_comp.shape[2]
    f32, i32 = torch.float32, torch.int32
    return (
        q_subj.new_empty((B, N), dtype=f32), q_subj.new_empty((B, N, C), dtype=f32),
        q_subj.new_empty((B, N), dtype=f32), q_subj.new_empty((B, N), dtype=i32), q_subj.new_empty((B,), dtype=i32),
    )
