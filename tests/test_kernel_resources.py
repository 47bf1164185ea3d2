"""bench/kernel_resources.py: the occupancy arithmetic, and real compiles for sm_80 (no GPU needed; in a child
process without the interpreter) whose report reflects the JIT's specialisation (divisibility hints vectorise
the loads) and tensor-core use."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaface.testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
KR = load_script(ROOT / "bench" / "kernel_resources.py")

COSINE = {  # a row-cosine configuration of the paper's 64² layer (as tests/triton_compile_check.py records it)
    "module": "adaface.kernels.soft_warp", "kernel": "_cos_fwd_kernel",
    "signature": {"o_ptr": "*fp32", "fs_ptr": "*fp32", "w_ptr": "*fp32", "loss_ptr": "*fp32", "N": "i32", "C": "i32",
                  "eps": "fp32"},
    "constexprs": {"BLOCK_R": 16, "BLOCK_CC": 256}, "num_warps": 4, "num_stages": 3,
    "divisible_by_16": ["o_ptr", "fs_ptr", "w_ptr", "loss_ptr", "N", "C"], "equal_to_1": [], "paper_shape": True,
}


@pytest.mark.parametrize("arch, warps, regs, shared, want", [
    (80, 4, 255, 0, 8),           # 255 regs -> 8192 per warp: 8 warps fit the 64K register file
    (80, 4, 32, 0, 64),           # the warp limit
    (86, 4, 32, 0, 48),           # sm_86 holds 48 warps
    (80, 8, 128, 82176, 16),      # shared memory: two 82 KB blocks (+1 KB reserved each) fit 164 KB
    (80, 8, 128, 90000, 8),       # ... two 89 KB blocks do not
    (90, 8, 168, 0, 8),           # 168 regs -> 5376 per warp: 12 warps -> one block of 8
    (86, 1, 16, 0, 16),           # the block limit (16 on sm_86)
])
def test_occupancy_warps(arch, warps, regs, shared, want):
    assert KR.occupancy_warps(arch, warps, regs, shared) == want


def test_parse_ptxas():
    log = ("ptxas info    : Function properties for k\n    1936 bytes stack frame, 2532 bytes spill stores, "
           "2500 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert KR.parse_ptxas(log) == {"registers": 255, "spill_store_bytes": 2532, "spill_load_bytes": 2500}
    with pytest.raises(RuntimeError, match="unexpected ptxas"):
        KR.parse_ptxas("nothing")


def _no_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _report(records: list[dict], tmp_path) -> list[dict]:
    """Rows of `python bench/kernel_resources.py --records ...` for sm_80 (run as a user runs it)."""
    recs, out = tmp_path / "records.json", tmp_path / "rows.json"
    recs.write_text(json.dumps(records))
    subprocess.run([sys.executable, "bench/kernel_resources.py", "--records", str(recs), "--arch", "80", "--jobs", "1",
                    "--json", str(out)], cwd=ROOT, env=_no_interpreter(), check=True, capture_output=True)
    return json.loads(out.read_text())


def test_divisibility_hints_reach_the_compiler(tmp_path):
    """With the JIT's hints the cosine kernel's loads are 16-byte vectors; without them they are scalar."""
    code = (
        "import json, sys\n"
        "from adaface.testing.scripts import load_script\n"
        "check = load_script('tests/triton_compile_check.py')\n"
        "rec = json.loads(sys.argv[1])\n"
        "print(int('ld.global.v4' in check.compile_config(rec, 80).asm['ptx']))\n"
    )
    found = [subprocess.run([sys.executable, "-c", code, json.dumps(rec)], cwd=ROOT, env=_no_interpreter(),
                            check=True, capture_output=True, text=True).stdout.strip()
             for rec in (COSINE, dict(COSINE, divisible_by_16=[]))]
    assert found == ["1", "0"]


def test_report_rows(tmp_path):
    """Every key of a row; tensor cores found in an fp16 soft-warp forward's SASS and not in the exact-fp32 one's."""
    fwd = {
        "module": "adaface.kernels.soft_warp", "kernel": "_fwd_kernel",
        "signature": {"qs_ptr": "*fp16", "qc_ptr": "*fp16", "fc_ptr": "*fp16", "order_ptr": "*i32", "count_ptr": "*i32",
                      "o_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "M": "i32", "Dq": "i32", "C": "i32",
                      "qk_scale": "fp32"},
        "constexprs": {"BLOCK_N": 32, "BLOCK_M": 32, "D0": 32, "D1": 16, "C0": 32, "C1": 0, "Q_RESIDENT": True,
                       "COMPUTE": {"triton_dtype": "fp16"}, "PREC": "ieee"},
        "num_warps": 4, "num_stages": 2, "divisible_by_16": [], "equal_to_1": [], "paper_shape": False,
    }
    exact = copy.deepcopy(fwd)
    exact["constexprs"]["COMPUTE"] = {"triton_dtype": "fp32"}
    cosine, half, full = _report([COSINE, fwd, exact], tmp_path)
    assert [r.get("error") for r in (cosine, half, full)] == [None, None, None]
    assert set(cosine) >= {"kernel", "arch", "config", "paper_shape", "registers", "spill_bytes", "shared_bytes",
                           "occupancy_warps", "mma"}
    assert cosine["kernel"] == "soft_warp._cos_fwd_kernel" and cosine["paper_shape"] and cosine["mma"] is False
    assert 0 < cosine["registers"] <= 255 and cosine["occupancy_warps"] > 0
    assert half["mma"] and half["mma_count"] > 0 and not full["mma"]
