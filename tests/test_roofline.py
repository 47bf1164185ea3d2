"""bench/roofline.py's model against what really runs: the eager reference's FLOPs against PyTorch's own
FlopCounterMode, and the kernels' tile loads (instructions and bytes, per kernel) against the loads the
Triton interpreter executes on small shapes, counted by wrapping the interpreter's load (test-only)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaface.kernels import soft_warp as K
from adaface.kernels._runtime import forced_tiles
from adaface.ops import soft_warp_loss, soft_warp_loss_reference
from adaface.testing.scripts import load_script
from adaface.testing.soft_warp_inputs import make_inputs, make_mask

ROOT = Path(__file__).resolve().parents[1]
ROOFLINE = load_script(ROOT / "bench" / "roofline.py")
SMALL = dict(K.TILE_KEYS)  # every tile at its least value (16; the forward's second pieces 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", [(2, 7, 9, 5, 6), (1, 33, 20, 40, 3)], ids=lambda s: "x".join(map(str, s)))
def test_eager_flops_match_flop_counter(shape, backward):
    B, N, M, Dq, C = shape
    x = [t.requires_grad_() for t in make_inputs(B, N, M, Dq, C, seed=1)]
    with FlopCounterMode(display=False) as counter:
        loss = soft_warp_loss_reference(*x, make_mask("bool", B, N, torch.device("cpu"), torch.Generator()))
        if backward:
            torch.autograd.grad(loss, x)
    model = sum(c.flops for c in ROOFLINE.eager_costs(B, N, M, Dq, C, backward).values())
    assert model == counter.get_total_flops()


@contextlib.contextmanager
def counting_loads():
    """Within the block, every load the interpreter executes is counted per kernel:
    {kernel: [instructions, bytes of the unmasked lanes]}."""
    from triton.runtime import interpreter

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    current = [""]
    real_load, real_run = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpretedFunction.run

    def load(self, ptrs, mask, *args, **kwargs):
        out = real_load(self, ptrs, mask, *args, **kwargs)
        entry = counts[current[0]]
        entry[0] += 1
        entry[1] += int(np.count_nonzero(mask.data)) * out.data.dtype.itemsize
        return out

    def run(self, *args, **kwargs):
        current[0] = self.fn.__name__
        return real_run(self, *args, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = load
    interpreter.InterpretedFunction.run = run
    try:
        yield counts
    finally:
        interpreter.InterpreterBuilder.create_masked_load = real_load
        interpreter.InterpretedFunction.run = real_run


# the forward with q resident in two pieces (41 = 32 + 9) and 16 + 16 output columns per program (35: the last
# program's second piece lies wholly past C)
RESIDENT = dict(SMALL, FWD_D0=32, FWD_D1=16, FWD_C1=16)
PIECES = dict(SMALL, BWD_OUT=64)  # the backward's outputs as two pieces (72, 80 → 64 + 16) in one chunk
ODD = (2, 37, 45, 41, 35)


@pytest.mark.parametrize("dtype, needs, shape, blocks", [
    (torch.float32, (True, True, True, True), ODD, SMALL),
    (torch.float16, (False, True, False, True), ODD, SMALL),
    (torch.float32, (True, False, False, False), ODD, RESIDENT),
    (torch.float32, (True, False, False, True), (2, 21, 19, 72, 80), PIECES),
    (torch.float32, (False, True, True, False), (2, 21, 19, 72, 80), PIECES),
], ids=["fp32_all_grads", "fp16_comp_grads", "fp32_resident_q", "two_pieces_dq_subj_dfeat_comp", "two_pieces_dq_comp"])
def test_kernel_tile_loads_match_the_interpreter(dtype, needs, shape, blocks):
    """16-wide tiles at odd sizes: several row / key / feature blocks, partial tiles, outputs split in 3 chunks
    (the backward's every 16 columns) or owned as two pieces, each subset of the column kernel's outputs."""
    B, N, M, Dq, C = shape
    x = make_inputs(B, N, M, Dq, C, dtype=dtype, seed=5)
    mask = make_mask("bool", B, N, torch.device("cpu"), torch.Generator().manual_seed(3))
    ins = [t.clone().requires_grad_(n) for t, n in zip(x, needs)]
    with forced_tiles(K, **blocks):
        cfg = K.tiles(N, M, Dq, C)
        with counting_loads() as counts:
            loss = soft_warp_loss(*ins, mask, backend="triton")
            torch.autograd.grad(loss, [t for t in ins if t.requires_grad])
    elem = torch.finfo(dtype).bits // 8
    model = ROOFLINE.kernel_costs(B, N, M, Dq, C, mask.sum(1).tolist(), cfg, elem=elem, do_elem=elem,
                                  precision="ieee", backward=True, needs=needs)
    executed = {name: tuple(v) for name, v in counts.items()}
    assert executed == {name: (c.loads, c.load_bytes) for name, c in model.items()}


def test_model_runs_and_labels_its_figures(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, "bench/roofline.py", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert "MODEL ESTIMATES" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    step = [r for r in rows if r["shape"].startswith("stage-2 step")]
    assert {r["variant"] for r in step} == {"eager (fp32)", "triton ieee", "triton tf32", "triton bf16"}


def test_measured_rows_are_printed_beside_the_model(tmp_path):
    import json
    import subprocess
    import sys

    info = {"device": "cuda (a GPU)", "dtype": "float32", "shape": "B2 N64 M64 Dq40 C24", "selected_rows": 70,
            "variant": "triton", "precision": "tf32"}
    bench = {"group": "soft_warp case fp32 fwd+bwd", "name": "t", "stats": {"median": 1e-3}, "extra_info": info}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [bench]}))
    proc = subprocess.run([sys.executable, "bench/roofline.py", "--measured", str(path)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    want = ROOFLINE.predicted_for_benchmark(info, backward=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("soft_warp case")]
    assert len(line) == 1 and f"{want['H100'] * 1e3:10.3f}" in line[0] and "1.000" in line[0]
