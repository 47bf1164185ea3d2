"""Compile every Triton kernel configuration the ops launch on CUDA, for real GPU targets, without a GPU.

    python tests/triton_compile_check.py                 # sm_80, sm_86, sm_89, sm_90
    python tests/triton_compile_check.py --arch 86 --arch 90 --json out.json
    python tests/triton_compile_check.py --arch 80 --arch 90 --fail-on-paper-spill

Why: the CPU test suite runs the kernels under TRITON_INTERPRET=1, which never lowers them to PTX, so a kernel
that does not compile for a GPU (a Triton version's API change, a type error only the compiler sees) or that
needs more shared memory than an architecture has (~99 KB on sm_86/sm_89) would first show on a GPU machine.

How: (1) `record`, in a child process under the interpreter: the public ops are called at the GPU tests' and
benchmarks' shapes and at the paper's (SD-1.5's 64², 32², 16² and 8² layers, the paper's batches) with the
launchers choosing exactly what they choose on CUDA (`cuda_choices`: their GPU tiles, warps, stages and operand
dtypes); every launch is recorded (argument types, constexprs, num_warps, num_stages, and the JIT's runtime
specialisation: pointers and integers divisible by 16 get a divisibility hint, integers equal to 1 become
constants — Triton's own `specialize_impl` decides) and skipped: `table()`. A configuration launched at a paper
shape is marked `paper_shape`. tests/test_gpu_configs.py executes every configuration of this table
under the interpreter. (2) `compile`, in another child without the interpreter: each distinct configuration is compiled
with `triton.compile` for each target (ptxas included) and its shared memory is checked against the
architecture's limit per block; with `--fail-on-paper-spill`, `ptxas -v` also reports each paper-shape
configuration's registers, and one that spills to local memory fails (a spill in the shapes training runs is a
slow kernel). Exit status 1 when any configuration fails. bench/kernel_resources.py reports on this same table
with the same compile (`compile_config`) and ptxas report (`ptxas_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Largest dynamic shared memory per block (bytes), from NVIDIA's compute-capability tables.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
KERNEL_MODULES = ("expanded_attention", "delta_cosine", "soft_warp", "ortho_subtract")


# ---------------------------------------------------------------------------------------------------------
# record (child process, TRITON_INTERPRET=1)


# Set while `_workloads` runs a paper-shape call: the configurations it launches are marked `paper_shape`.
_PAPER_SHAPE = [False]


@contextlib.contextmanager
def _paper_shape() -> Iterator[None]:
    _PAPER_SHAPE[0] = True
    try:
        yield
    finally:
        _PAPER_SHAPE[0] = False


# SD-1.5's cross-attention layers at 512² (64² latents): (positions N, channels C); the queries have C features.
SD15_LAYERS = ((4096, 320), (1024, 640), (256, 1280), (64, 1280))
STAGE2_BATCH = 3  # the paper's stage-2 batch (training/configs/stage2_paper.json)


def _paper_workloads():
    """The ops as training calls them at the paper's settings: stage 2's soft-warp loss on every SD-1.5 layer
    (fp32 inputs after the norms; bf16/fp16 for the other precisions), its delta losses on the pooled maps
    (kernel 4, stride 2 above 8², fp32 after the layer norm) and prompt embeddings, and stage 1's Prompt
    Inverter (CLIP-L text: 12 heads of 64, 77 tokens, causal, multi-Q/V E = 8)."""
    import torch

    from adaface.ops import delta_cosine_loss, soft_warp_loss
    from adaface.testing.soft_warp_inputs import make_mask

    B = STAGE2_BATCH
    # stage 2's fp32 inputs at each precision (on a GPU "auto" is tf32 or the autocast dtype); fp16/bf16 inputs
    soft_warp = [(torch.float32, p) for p in ("tf32", "bf16", "fp16", "ieee")]
    soft_warp += [(torch.float16, "auto"), (torch.bfloat16, "auto")]
    with _paper_shape():
        for dtype, precision in soft_warp:
            for N, C in SD15_LAYERS:
                xs = [torch.zeros(B, N, C, dtype=dtype, requires_grad=True) for _ in range(4)]
                mask = make_mask("bool", B, N, torch.device("cpu"), torch.Generator().manual_seed(0))
                torch.autograd.grad(soft_warp_loss(*xs, mask, backend="triton", precision=precision), xs)
        paper_attention()
        for N, C in SD15_LAYERS:
            side = int(N**0.5)
            rows = ((side - 4) // 2 + 1) ** 2 if side > 8 else N
            for width in (C, 8 * 16):  # attention outputs; attention maps (8 heads x 16 subject slots)
                xs = [torch.zeros(B, rows, width, requires_grad=i < 2) for i in range(4)]
                torch.autograd.grad(delta_cosine_loss(*xs, reduction="none", backend="triton").sum(), xs[:2])
        xs = [torch.zeros(B, 77, 768, requires_grad=i < 2) for i in range(4)]
        torch.autograd.grad(delta_cosine_loss(*xs, reduction="none", backend="triton").sum(), xs[:2])


def paper_attention() -> None:
    """Stage 1's Prompt Inverter attention (CLIP-L text: 12 heads of 64, 77 tokens, causal, multi-Q/V E = 8, batch
    4), forward and backward, in each input dtype."""
    import torch

    from adaface.ops import expanded_attention
    from adaface.testing.attention_inputs import as_views, make_leaves

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        leaves = make_leaves(4, 12, 77, 77, 64, 8, "qv", dtype=dtype, layout="proj")
        q, k, v = as_views(leaves, "proj", 8)
        out = expanded_attention(q, k, v, causal=True, backend="triton")
        torch.autograd.grad(out, leaves, torch.ones_like(out))


def _workloads():
    """The ops at the shapes the gpu tests and the CUDA benchmarks use (values never matter: nothing runs)."""
    import torch

    from adaface.ops import delta_cosine_loss, expanded_attention, ortho_subtract, soft_warp_loss
    from adaface.testing.attention_inputs import as_views, make_leaves
    from adaface.testing.soft_warp_inputs import make_mask

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dtypes:
        for D in (40, 64, 128):
            for mode, E in (("none", 1), ("qv", 8), ("kv", 8), ("qkv", 16)):
                for causal in (True, False):
                    L = 512 if D == 128 else 77
                    leaves = make_leaves(1, 2, L, L, D, E, mode, dtype=dtype, layout="proj")
                    q, k, v = as_views(leaves, "proj", E)
                    out = expanded_attention(q, k, v, causal=causal, backend="triton")
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
        for shape in ((4, 4096, 1280), (4, 4096, 320), (4, 1310720), (3, 5, 21)):
            xs = [torch.zeros(shape, dtype=dtype, requires_grad=i < 2) for i in range(4)]
            loss = delta_cosine_loss(*xs, backend="triton")
            torch.autograd.grad(loss, xs[:2])
        for B, N, M, Dq, C, kind in ((4, 4096, 4096, 320, 320, "none"), (4, 4096, 4096, 320, 320, "bool"),
                                     (4, 64, 64, 1280, 1280, "none"), (2, 77, 33, 40, 24, "bool")):
            xs = [torch.zeros(B, n, d, dtype=dtype, requires_grad=True) for n, d in ((N, Dq), (M, Dq), (N, C), (M, C))]
            mask = make_mask(kind, B, N, torch.device("cpu"), torch.Generator().manual_seed(0))
            loss = soft_warp_loss(*xs, mask, backend="triton")
            torch.autograd.grad(loss, xs)
        for shape in ((2, 77, 768), (3, 5, 33)):
            a = torch.zeros(shape, dtype=dtype, requires_grad=True)
            b = torch.zeros(shape, dtype=dtype, requires_grad=True)
            out = ortho_subtract(a, b, backend="triton")
            torch.autograd.grad(out, (a, b), torch.ones_like(out))
    _paper_workloads()


@contextlib.contextmanager
def recording() -> Iterator[dict[str, dict]]:
    """Inside the block (under TRITON_INTERPRET=1), every kernel launch is recorded and skipped, not run.

    Yields {key: configuration}: the kernel, its argument types (tensor dtypes, i32/i64, fp32), constexprs,
    num_warps, num_stages and the JIT's specialisation (`divisible_by_16`, `equal_to_1`: argument names); the key
    is the configuration's canonical JSON, so equal launches count once. `paper_shape` (not part of the key) is
    true when a paper-shape workload launched it.
    """
    import inspect

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction

    dtypes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
    records: dict[str, dict] = {}

    def run(self, *args, grid, warmup, **kwargs):  # replaces the interpreter's launch: record, do not run
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        sig, consts, div16, ones = {}, {}, [], []
        for name, param in params.items():
            value = bound.get(name, param.default)
            if "constexpr" in str(param.annotation):
                value = getattr(value, "value", value)
                is_dtype = type(value).__name__ == "dtype"  # a Triton dtype constexpr (e.g. an output type)
                consts[name] = {"triton_dtype": str(value)} if is_dtype else value
            elif isinstance(value, torch.Tensor):
                sig[name] = "*" + dtypes[value.dtype]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(value).__name__}")
            if name not in consts and isinstance(value, (torch.Tensor, int)) and not isinstance(value, bool):
                # what triton.runtime.jit's binder asks for every unannotated argument (a CPU tensor's address
                # modulo 16 is a CUDA one's: both allocators align blocks to far more, views add the same offset)
                kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
                if kind == "constexpr":
                    ones.append(name)
                elif attr == "D":
                    div16.append(name)
        rec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": sig, "constexprs": consts,
               "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
               "divisible_by_16": div16, "equal_to_1": ones}
        key = json.dumps(rec, sort_keys=True)
        seen = records.setdefault(key, dict(rec, paper_shape=False))
        seen["paper_shape"] = seen["paper_shape"] or _PAPER_SHAPE[0]

    real_run = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        yield records
    finally:
        InterpretedFunction.run = real_run


@contextlib.contextmanager
def cuda_choices() -> Iterator[None]:
    """Inside the block the launchers choose what they choose on CUDA: their `gpu_tiles` (kernels/_runtime.py),
    and the operand dtypes of a GPU (bf16 tiles fed to tl.dot as bf16, which the interpreter cannot run)."""
    import importlib

    from adaface.kernels._runtime import gpu_tiles

    modules = [importlib.import_module(f"adaface.kernels.{mod}") for mod in KERNEL_MODULES]
    saved = {m: m.interpreting for m in modules if hasattr(m, "interpreting")}
    try:
        for m in saved:
            m.interpreting = lambda: False
        with gpu_tiles(*modules):
            yield
    finally:
        for m, fn in saved.items():
            m.interpreting = fn


def table() -> list[dict]:
    """Every distinct configuration the ops launch on CUDA at the workloads' shapes (nothing runs)."""
    with recording() as records, cuda_choices():
        _workloads()
    return list(records.values())


def _record(path: str) -> None:
    records = table()
    Path(path).write_text(json.dumps(records, indent=1))
    print(f"recorded {len(records)} distinct kernel configurations")


# ---------------------------------------------------------------------------------------------------------
# compile (child process, no interpreter)


def compile_config(rec: dict, arch: int):
    """`triton.compile` of one recorded configuration for sm_`arch`, specialised as the JIT specialises it:
    the integers equal to 1 are constants, the pointers and integers divisible by 16 carry that hint."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    ones = rec.get("equal_to_1", [])
    sig = dict(rec["signature"], **{name: "constexpr" for name in [*rec["constexprs"], *ones]})
    sig = {name: sig[name] for name in fn.arg_names}
    consts = {k: tl.core.dtype(v["triton_dtype"]) if isinstance(v, dict) else v for k, v in rec["constexprs"].items()}
    consts.update({name: 1 for name in ones})
    attrs = {(fn.arg_names.index(name),): CUDABackend.parse_attr("D") for name in rec.get("divisible_by_16", [])}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})


def nvidia_tool(name: str) -> str:
    """A CUDA binary utility shipped with Triton (ptxas, cuobjdump)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers and spill bytes per thread from `ptxas -v`'s report."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-300:]}")
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spill.group(1)),
            "spill_load_bytes": int(spill.group(2))}


def ptxas_report(compiled) -> dict[str, int]:
    """`ptxas -v`'s registers and spill bytes per thread for a `compile_config` result, on its own target."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = compiled.metadata.target.arch
    gpu = f"sm_{target}" + ("a" if target == 90 else "")
    ptxas = get_ptxas(target).path  # the one Triton assembled it with (3.9 uses a newer ptxas from sm_90 up)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp, "k.o"))],
                             capture_output=True, text=True, check=True).stderr
    return parse_ptxas(log)


def _compile_one(rec: dict, arch: int, fail_on_paper_spill: bool = False) -> dict:
    """Compile one recorded configuration for one target; the row says whether it fits (and, with
    `fail_on_paper_spill`, whether a paper-shape configuration keeps every value in registers)."""
    row = {"kernel": f"{rec['module'].rsplit('.', 1)[-1]}.{rec['kernel']}", "arch": arch,
           "num_warps": rec["num_warps"], "num_stages": rec["num_stages"],
           "constexprs": {k: v for k, v in rec["constexprs"].items() if v is not None},
           "pointers": sorted({v for v in rec["signature"].values() if v.startswith("*")}),
           "paper_shape": bool(rec.get("paper_shape"))}
    try:
        compiled = compile_config(rec, arch)
        row["shared"] = int(compiled.metadata.shared)
        row["ok"] = row["shared"] <= SHARED_LIMIT[arch]
        if not row["ok"]:
            row["error"] = f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B"
        elif fail_on_paper_spill and row["paper_shape"]:
            figures = ptxas_report(compiled)
            spill = figures["spill_store_bytes"] + figures["spill_load_bytes"]
            row.update(figures, spill_bytes=spill, ok=spill == 0)
            if spill:
                row["error"] = (f"paper-shape configuration spills {spill} B per thread "
                                f"({figures['spill_store_bytes']} B stores + {figures['spill_load_bytes']} B loads) "
                                f"at {figures['registers']} registers")
    except Exception as exc:  # noqa: BLE001 - reported per configuration
        row["ok"] = False
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
    return row


def _compile(path: str, archs: list[int], out_json: str | None, jobs: int, fail_on_paper_spill: bool = False) -> int:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import triton
    from tqdm import tqdm

    records = json.loads(Path(path).read_text())
    work = [(rec, arch, fail_on_paper_spill) for arch in archs for rec in records]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_compile_one, *zip(*work), chunksize=4), total=len(work),
                            desc="compiling", unit="config"))
    failures = [r for r in results if not r["ok"]]
    for r in failures:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {'/'.join(r['pointers'])} {r['constexprs']} warps={r['num_warps']} "
              f"stages={r['num_stages']}: {r['error']}")
    largest = {a: max((r.get("shared", 0) for r in results if r["arch"] == a), default=0) for a in archs}
    print(f"triton {triton.__version__}: {len(records)} configurations x {len(archs)} targets, {len(failures)} failed; "
          "largest shared memory: " + ", ".join(f"sm_{a} {largest[a]} B (limit {SHARED_LIMIT[a]})" for a in archs))
    if fail_on_paper_spill:
        paper = [r for r in results if "spill_bytes" in r]
        print(f"paper-shape configurations checked for spills: {len(paper)}, spilling: "
              f"{sum(r['spill_bytes'] > 0 for r in paper)}")
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=1))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                    help="compute capability ×10 (repeatable; default: all of 80, 86, 89, 90)")
    ap.add_argument("--json", help="write one row per (configuration, target) here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--fail-on-paper-spill", action="store_true",
                    help="also fail when a paper-shape configuration spills registers (ptxas -v)")
    ap.add_argument("--_record", help=argparse.SUPPRESS)
    ap.add_argument("--_compile", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    archs = args.arch or sorted(SHARED_LIMIT)
    if args._record:
        _record(args._record)
        return 0
    if args._compile:
        return _compile(args._compile, archs, args.json, args.jobs, args.fail_on_paper_spill)
    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, __file__, "--_record", rec], check=True, env=env, cwd=ROOT)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        extra = [a for arch in archs for a in ("--arch", str(arch))] + ["--jobs", str(args.jobs)]
        extra += ["--json", args.json] if args.json else []
        extra += ["--fail-on-paper-spill"] if args.fail_on_paper_spill else []
        return subprocess.run([sys.executable, __file__, "--_compile", rec, *extra], env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
