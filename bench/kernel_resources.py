"""The compiler's report on every Triton kernel configuration the ops launch on CUDA: registers, spills, shared
memory, occupancy and tensor-core use, per target architecture, without a GPU.

    python bench/kernel_resources.py                                   # sm_80, sm_86, sm_90; a summary table
    python bench/kernel_resources.py --arch 80 --arch 90 --json resources.json
    python bench/kernel_resources.py --paper-shape-only                # only what the paper's shapes launch
    python bench/kernel_resources.py --summary resources.json          # the summary table of written rows

The configurations are tests/triton_compile_check.py's table (one enumeration: the ops called at the tests',
benchmarks' and paper's shapes with the CUDA launch choices, each compiled with the JIT's specialisation).
Each is compiled by the check's `compile_config` for the target; then the PTX goes through `ptxas -v` (registers
and spill bytes per thread: the check's `ptxas_report`, which its `--fail-on-paper-spill` also reads) and the
cubin through `cuobjdump -sass` (tensor-core instructions), both from Triton's `backends/nvidia/bin`.
One JSON row per kernel, configuration and architecture:
    kernel, arch, config (argument types, constexprs, warps, stages, JIT hints), paper_shape (launched at the
    paper's shapes: SD-1.5's 64², 32², 16², 8² layers at the paper's batches), registers (per thread),
    spill_bytes (spill stores + loads per thread), shared_bytes (per block), occupancy_warps (resident warps
    per SM: `occupancy_warps`), mma (tensor-core instructions in the SASS: HMMA / HGMMA / IMMA) and mma_count.
These are what the compiler produces, not measurements of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaface.testing.scripts import load_script  # noqa: E402

CHECK = load_script(ROOT / "tests" / "triton_compile_check.py")  # the table, its compile and the ptxas report
parse_ptxas = CHECK.parse_ptxas

# Per-SM limits by compute capability, from the CUDA C++ Programming Guide's "Technical Specifications per
# Compute Capability" table (resident warps, resident blocks, 32-bit registers, shared memory per SM) and the
# CUDA Occupancy Calculator (registers allocated per warp in units of 256; 1 KB of shared memory reserved per
# block by the system from compute capability 8.0 on).
SM_LIMITS = {
    80: {"warps": 64, "blocks": 32, "registers": 65536, "shared": 164 * 1024},
    86: {"warps": 48, "blocks": 16, "registers": 65536, "shared": 100 * 1024},
    89: {"warps": 48, "blocks": 24, "registers": 65536, "shared": 100 * 1024},
    90: {"warps": 64, "blocks": 32, "registers": 65536, "shared": 228 * 1024},
}
REGISTER_UNIT = 256  # registers are allocated per warp in multiples of this
RESERVED_SHARED = 1024  # bytes per block
MMA_OPCODES = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|DMMA|QGMMA)\b")


def occupancy_warps(arch: int, num_warps: int, registers: int, shared_bytes: int) -> int:
    """Resident warps per SM for blocks of `num_warps` warps using `registers` per thread and `shared_bytes`."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(lim["blocks"], lim["warps"] // num_warps, lim["registers"] // per_warp // num_warps)
    if shared_bytes:
        blocks = min(blocks, lim["shared"] // (shared_bytes + RESERVED_SHARED))
    return blocks * num_warps


def resources(rec: dict, arch: int) -> dict:
    """One JSON row: compile `rec` for sm_`arch` and read the compiler's figures."""
    config = {k: v for k, v in rec.items() if k not in ("module", "kernel", "paper_shape")}
    row = {"kernel": f"{rec['module'].rsplit('.', 1)[-1]}.{rec['kernel']}", "arch": arch, "config": config,
           "paper_shape": bool(rec.get("paper_shape"))}
    try:
        compiled = CHECK.compile_config(rec, arch)
        figures = CHECK.ptxas_report(compiled)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp, "k.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([CHECK.nvidia_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
    except Exception as exc:  # noqa: BLE001 - reported per row
        return dict(row, error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300])
    shared = int(compiled.metadata.shared)
    mma_count = len(MMA_OPCODES.findall(sass))
    occupancy = occupancy_warps(arch, rec["num_warps"], figures["registers"], shared)
    return dict(row, registers=figures["registers"],
                spill_bytes=figures["spill_store_bytes"] + figures["spill_load_bytes"],
                spill_store_bytes=figures["spill_store_bytes"], spill_load_bytes=figures["spill_load_bytes"],
                shared_bytes=shared, occupancy_warps=occupancy,
                mma=mma_count > 0, mma_count=mma_count)


def _dtype(row: dict) -> str:
    """The first floating-point pointer's dtype, and the matmul operands' where a kernel names them (COMPUTE,
    PREC: soft-warp), e.g. "fp32>tf32"."""
    ptrs = [v for v in row["config"]["signature"].values() if v.startswith("*") and v[1:] in ("fp32", "fp16", "bf16")]
    name = ptrs[0][1:] if ptrs else "-"
    consts = row["config"]["constexprs"]
    if isinstance(consts.get("COMPUTE"), dict):
        compute = consts["COMPUTE"]["triton_dtype"]
        compute = "tf32" if consts.get("PREC") == "tf32" else ("ieee" if compute == "fp32" else compute)
        name += f">{compute}"
    return name


def summary(rows: list[dict]) -> str:
    """Per kernel, input dtype and architecture: the worst paper-shape row (all rows where none is paper shape)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["kernel"], _dtype(r), r["arch"]), []).append(r)
    lines = [f"{'kernel':34} {'dtype':9} {'arch':6} {'paper':5} {'regs':>4} {'spill B':>8} {'shared B':>9} "
             f"{'warps/SM':>8} mma"]
    for (kernel, dtype, arch), group in sorted(groups.items()):
        paper = [r for r in group if r["paper_shape"]]
        pick = paper or group
        lines.append(f"{kernel:34} {dtype:9} sm_{arch:<3} {'yes' if paper else 'no':5} "
                     f"{max(r['registers'] for r in pick):>4} {max(r['spill_bytes'] for r in pick):>8} "
                     f"{max(r['shared_bytes'] for r in pick):>9} {min(r['occupancy_warps'] for r in pick):>8} "
                     f"{'yes' if all(r['mma'] for r in pick) else ('some' if any(r['mma'] for r in pick) else 'no')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SM_LIMITS),
                    help="compute capability x10 (repeatable; default: 80, 86, 90)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--paper-shape-only", action="store_true", help="only the configurations of the paper's shapes")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--summary", metavar="JSON", help="instead: print the summary of rows written by --json")
    ap.add_argument("--records", metavar="JSON", help="compile these recorded configurations (a JSON list in the "
                    "compile check's format) instead of the compile check's table")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(json.loads(Path(args.summary).read_text())))
        return 0
    archs = args.arch or [80, 86, 90]

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    if args.records:
        records = json.loads(Path(args.records).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            table = os.path.join(tmp, "launches.json")
            env = dict(os.environ, TRITON_INTERPRET="1")
            subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py"), "--_record", table],
                           check=True, env=env, cwd=ROOT)
            records = json.loads(Path(table).read_text())
    if args.paper_shape_only:
        records = [r for r in records if r["paper_shape"]]
    work = [(rec, arch) for arch in archs for rec in records]
    os.environ.pop("TRITON_INTERPRET", None)  # the workers compile for real targets
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = list(tqdm(pool.map(resources, *zip(*work)), total=len(work), desc="compiling", unit="config"))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['config']}: {r['error']}")
    print(summary(rows))
    paper = [r for r in rows if r["paper_shape"] and "error" not in r]
    dots = [r for r in paper if _uses_dot(r)]
    exact = [r for r in dots if _exact_fp32(r)]
    print(f"paper-shape rows: {len(paper)}, with spills: {sum(r['spill_bytes'] > 0 for r in paper)}, "
          f"soft-warp tf32/bf16/fp16 rows without tensor cores: {sum(not r['mma'] for r in dots if r not in exact)} "
          f"(exact-fp32 'ieee' rows, on the CUDA cores by definition: {len(exact)})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


def _uses_dot(row: dict) -> bool:
    """The soft-warp kernels with matmuls (the cosine and prep kernels have none)."""
    return row["kernel"].startswith("soft_warp.") and row["kernel"].split(".")[-1] in (
        "_fwd_kernel", "_bwd_dq_kernel", "_bwd_col_kernel")


def _exact_fp32(row: dict) -> bool:
    """A soft-warp configuration with fp32 operands and "ieee" dots (`precision="ieee"`: no tensor cores)."""
    constexprs = row["config"]["constexprs"]  # a dtype constexpr is recorded as {"triton_dtype": name}
    return constexprs["PREC"] == "ieee" and constexprs["COMPUTE"] == {"triton_dtype": "fp32"}


if __name__ == "__main__":
    sys.exit(main())
