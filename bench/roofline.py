"""A traffic / FLOP model of the soft-warp loss (paper eq. 7–8) at the paper's shapes: MODEL ESTIMATES, not
measurements.

    python bench/roofline.py                 # the table: per SD-1.5 layer and a whole stage-2 step
    python bench/roofline.py --json model.json
    python bench/roofline.py --measured bench.json     # measured soft-warp benchmark times beside the model

For the eager reference (`soft_warp_loss_reference`, fp32 as training hands it the inputs) and for the Triton
kernels (kernels/soft_warp.py) as their grids load tiles at the launch configuration CUDA picks (`gpu_tiles`):
- FLOPs: the matmul work. Eager: 2·B·N·M·(Dq + C) forward (every row: the reference materialises the N×M
  matrix and masks only the mean), twice that in the backward. Kernels: the tile products each program executes,
  padding of the last output chunk and every recomputation of the scores / dP included.
- bytes: Eager: device-memory traffic, every [B, N, M] intermediate written and read again (logits, scaled
  logits, softmax, and in the backward dA, dS), plus the operands. Kernels: `tile_bytes`, every tile load as
  issued (re-loads counted, masked-off lanes not) plus the stores — served by L2 or device memory — and
  `bytes`, the device-memory traffic assuming the re-loads hit L2 (each tensor a kernel touches crosses the
  memory bus once: one batch's K and V, ≤ 10 MB at the paper's shapes in fp32, stay resident in a 40–50 MB L2;
  on the A6000's 6 MB L2 this is optimistic).
- time: Σ over kernels (eager: over its ops) of max(FLOPs / peak compute, bytes / peak bandwidth) at the
  published peaks below (`PEAKS`), with the compute peak of the matmul precision: "ieee" fp32 on the CUDA cores,
  "tf32" / "bf16" / "fp16" on the tensor cores (dense rates).
tests/test_roofline.py checks the model: the eager FLOPs against torch.utils.flop_counter.FlopCounterMode, and
the kernels' tile loads (count and bytes) against what TRITON_INTERPRET=1 executes on small shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Published peaks (dense, no sparsity). RTX A6000 (GA102, 84 SMs): NVIDIA RTX A6000 datasheet — 768 GB/s GDDR6,
# 38.7 TFLOPS FP32, 309.7 TFLOPS FP16 tensor with sparsity (154.8 dense), TF32 at half the FP16 tensor rate.
# H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet — 3.35 TB/s HBM3, 67 TFLOPS FP32, 989 TFLOPS TF32 and
# 1,979 TFLOPS BF16/FP16 with sparsity (494.7 and 989.4 dense).
PEAKS = {
    "A6000": {"bandwidth": 768e9, "ieee": 38.7e12, "tf32": 77.4e12, "bf16": 154.8e12, "fp16": 154.8e12},
    "H100": {"bandwidth": 3.35e12, "ieee": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
}
# SD-1.5 at 512² (64² latents): its 16 cross-attention layers as (positions N = M, channels Dq = C, how many)
STAGE2_LAYERS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))
STAGE2_BATCH = 3  # the paper's stage-2 batch (training/configs/stage2_paper.json)
FACE_FRACTION = 0.35  # rows under the face mask (the benchmark's mask); the kernels compute only those


@dataclass
class Cost:
    """One kernel's (or eager op's) modelled work."""

    flops: float = 0.0
    load_bytes: float = 0.0
    store_bytes: float = 0.0
    loads: int = 0  # load instructions issued (tile loads, re-loads counted)
    precision: str = "ieee"
    footprint: float | None = None  # bytes read once from device memory (None: load_bytes, nothing re-loaded)

    @property
    def tile_bytes(self) -> float:
        return self.load_bytes + self.store_bytes

    @property
    def bytes(self) -> float:
        return (self.load_bytes if self.footprint is None else self.footprint) + self.store_bytes

    def time(self, gpu: str) -> float:
        peak = PEAKS[gpu]
        return max(self.flops / peak[self.precision], self.bytes / peak["bandwidth"])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------
# eager reference


def eager_costs(B: int, N: int, M: int, Dq: int, C: int, backward: bool, elem: int = 4) -> dict[str, Cost]:
    """`soft_warp_loss_reference` (upcast: fp32 throughout), op by op. Every input requires grad."""
    nm, f = B * N * M * 4, 4
    q, k, v, fs = B * N * Dq * elem, B * M * Dq * elem, B * M * C * elem, B * N * C * elem
    o = B * N * C * f
    out = {
        "logits = q kᵀ": Cost(2 * B * N * M * Dq, q + k, nm),
        "· scale": Cost(0, nm, nm),
        "softmax": Cost(0, nm, nm),
        "warped = A v": Cost(2 * B * N * M * C, nm + v, o),
        "cosine": Cost(0, o + fs, B * N * f),
    }
    if backward:
        out.update({
            "cosine backward": Cost(0, o + fs + B * N * f, 2 * o),
            "dA = dO vᵀ": Cost(2 * B * N * M * C, o + v, nm),
            "dv = Aᵀ dO": Cost(2 * B * N * M * C, nm + o, v),
            "softmax backward": Cost(0, 2 * nm, nm),
            "· scale backward": Cost(0, nm, nm),
            "dq = dS k": Cost(2 * B * N * M * Dq, nm + k, q),
            "dk = dSᵀ q": Cost(2 * B * N * M * Dq, nm + q, k),
        })
    return out


# ---------------------------------------------------------------------------------------------------------
# the Triton kernels, as their grids load tiles


def kernel_costs(B: int, N: int, M: int, Dq: int, C: int, counts: list[int], cfg: dict, *, elem: int, do_elem: int,
                 precision: str, backward: bool, needs: tuple[bool, bool, bool, bool] = (True,) * 4
                 ) -> dict[str, Cost]:
    """Per launched kernel of kernels/soft_warp.py: FLOPs of the tile products executed (padding included),
    bytes of every tile load (masked lanes excluded) and store, and the load instructions issued.

    `counts[b]`: the selected rows of batch b; `cfg`: the launch configuration (`gpu_tiles`); `elem` /
    `do_elem`: bytes per input / stored-dO element; `needs`: which of q_subj, q_comp, feat_subj, feat_comp
    need gradients. Mirrors the launchers' and kernels' loops one for one.
    """
    nCC, nRp = _cdiv(C, cfg["BLOCK_CC"]), _cdiv(N, cfg["BLOCK_R"])
    cnt = sum(counts)
    f = 4
    out: dict[str, Cost] = {}
    if B == 0 or N == 0:
        return out

    fwd = Cost(precision=precision)  # one program per FWD_BLOCK_N rows × (C0 + C1) output columns
    FN, FM, D0, D1, C0, C1 = (cfg[k] for k in ("FWD_BLOCK_N", "FWD_BLOCK_M", "FWD_D0", "FWD_D1", "FWD_C0", "FWD_C1"))
    resident = Dq <= D0 + D1  # q loaded once in its pieces; else streamed with every key block in D0 chunks
    q_pieces = 1 + (D1 > 0) if resident else 0
    d_pad = D0 + D1 if resident else _cdiv(Dq, D0) * D0
    fNb, fM, fC = _cdiv(N, FN), _cdiv(M, FM), max(_cdiv(C, C0 + C1), 1)
    fW = sum(_cdiv(c, FN) for c in counts)  # row blocks that hold selected rows
    per_key = q_pieces if resident else 2 * _cdiv(Dq, D0)
    fwd.loads = B * fNb * fC + fW * fC * (1 + q_pieces + fM * (per_key + 1 + (C1 > 0)))
    q_bytes = fC * cnt * Dq * elem * (1 if resident else fM)
    fwd.load_bytes = B * fNb * fC * 4 + fC * cnt * 4 + q_bytes + fW * fC * M * Dq * elem + fW * M * C * elem
    fwd.flops = fW * fC * fM * (2 * FN * FM * d_pad + 2 * FN * FM * (C0 + C1))
    fwd.store_bytes = cnt * C * f + cnt * f
    busy = sum(1 for c in counts if c)  # batches whose K / V are read
    kv = busy * M * (Dq + C) * elem
    fwd.footprint = B * 4 + cnt * 4 + cnt * Dq * elem + kv
    out["_fwd_kernel"] = fwd
    cos = Cost(loads=nRp * B * (1 + 2 * nCC), load_bytes=B * N * 4 + cnt * C * (f + elem), store_bytes=B * N * f)
    out["_cos_fwd_kernel"] = cos
    if not backward:
        return out

    need_qs, need_qc, need_fs, need_fc = needs
    need_do = need_qs or need_qc or need_fc
    if need_do or need_fs:
        prep_rows, prep_cc = _cdiv(N, cfg["BWD_BLOCK_R"]), _cdiv(C, cfg["BWD_BLOCK_CC"])
        out["_bwd_prep_kernel"] = Cost(
            loads=prep_rows * B * (2 + 4 * prep_cc), load_bytes=B * N * 4 + 2 * cnt * C * (f + elem) + cnt * 4,
            store_bytes=(cnt * C * do_elem + cnt * f if need_do else 0) + (B * N * C * elem if need_fs else 0))
    out.update(_backward_costs(B, N, M, Dq, C, counts, cfg, elem, do_elem, precision, needs))
    return out


def _backward_costs(B: int, N: int, M: int, Dq: int, C: int, counts: list[int], cfg: dict, elem: int, do_elem: int,
                    precision: str, needs: tuple[bool, bool, bool, bool]) -> dict[str, Cost]:
    """The dq_subj row kernel and the fused dq_comp / dfeat_comp column kernel, load for load (`kernel_costs`)."""
    from adaface.kernels.soft_warp import bwd_pieces

    need_qs, need_qc, _, need_fc = needs
    (D0, D1), (C0, C1) = bwd_pieces(Dq, C, cfg["BWD_OUT"])
    BD, BC = cfg["BWD_BLOCK_D"], cfg["BWD_BLOCK_C"]
    nDb, nCb = _cdiv(Dq, BD), _cdiv(C, BC)
    pd, pc = 1 + (D1 > 0), 1 + (C1 > 0)  # output pieces (one load each)
    cnt, busy = sum(counts), sum(1 for c in counts if c)
    rows_in = cnt * (Dq * elem + C * do_elem)  # the selected rows of q_subj and dO, once
    out: dict[str, Cost] = {}
    if need_qs:
        BNq, BMq = cfg["BWD_DQ_BLOCK_N"], cfg["BWD_DQ_BLOCK_M"]
        nO, nMq = _cdiv(Dq, D0 + D1), _cdiv(M, BMq)
        W = sum(_cdiv(c, BNq) for c in counts)  # row blocks that hold selected rows (the others only store 0)
        dq = Cost(precision=precision)
        # per program: count, order, lse, D; per key step: S (q, K chunks), dP (dO, V chunks), the K pieces
        dq.loads = 4 * B * _cdiv(N, BNq) * nO + W * nO * nMq * (2 * nDb + 2 * nCb + pd)
        dq.load_bytes = nO * (B * _cdiv(N, BNq) * 4 + B * N * 4 + 2 * cnt * 4 + nMq * rows_in
                              + W * M * (Dq + C) * elem) + W * M * Dq * elem
        dq.flops = W * nO * nMq * 2 * BNq * BMq * (BD * nDb + BC * nCb + D0 + D1)
        dq.store_bytes = B * N * Dq * elem
        dq.footprint = B * 4 + B * N * 4 + 2 * cnt * 4 + rows_in + busy * M * (Dq + C) * elem
        out["_bwd_dq_kernel"] = dq
    if need_qc or need_fc:
        BNc, BMc = cfg["BWD_BLOCK_N"], cfg["BWD_BLOCK_M"]
        nMc = _cdiv(M, BMc)
        nO = max(_cdiv(Dq, D0 + D1) if need_qc else 1, _cdiv(C, C0 + C1) if need_fc else 1)
        W = sum(_cdiv(c, BNc) for c in counts)  # row steps of every key-block program of batch b
        col = Cost(precision=precision)
        # per row step: order, S (K, q chunks), lse; dq_comp: dP (V, dO chunks), D, the q pieces; dfeat_comp:
        # the dO pieces
        step_loads = 2 + 2 * nDb + (2 * nCb + 1 + pd if need_qc else 0) + (pc if need_fc else 0)
        col.loads = B * nMc * nO + nMc * nO * W * step_loads
        col.load_bytes = (B * nMc * nO * 4 + nO * (2 * nMc * cnt * 4 + W * M * Dq * elem + nMc * cnt * Dq * elem)
                          + (nO * (nMc * cnt * 4 + W * M * C * elem + nMc * cnt * C * do_elem)
                             + nMc * cnt * Dq * elem if need_qc else 0)
                          + (nMc * cnt * C * do_elem if need_fc else 0))
        step_flops = BD * nDb + (BC * nCb + D0 + D1 if need_qc else 0) + (C0 + C1 if need_fc else 0)
        col.flops = nMc * nO * W * 2 * BMc * BNc * step_flops
        col.store_bytes = (B * M * Dq * elem if need_qc else 0) + (B * M * C * elem if need_fc else 0)
        col.footprint = (B * 4 + cnt * (8 + (4 if need_qc else 0)) + rows_in
                         + busy * M * (Dq + (C if need_qc else 0)) * elem)
        out["_bwd_col_kernel"] = col
    return out


PRECISION_BYTES = {"ieee": 4, "tf32": 4, "bf16": 2, "fp16": 2}


def triton_costs(B: int, N: int, M: int, Dq: int, C: int, counts: list[int], precision: str,
                 backward: bool) -> dict[str, Cost]:
    """The kernels on fp32 inputs (the training path) at the CUDA launch configuration, with `precision`."""
    from adaface.kernels.soft_warp import gpu_tiles

    cfg = gpu_tiles(N, M, Dq, C, precision=precision, elem=4)
    return kernel_costs(B, N, M, Dq, C, counts, cfg, elem=4, do_elem=PRECISION_BYTES[precision],
                        precision=precision, backward=backward)


def total(costs: dict[str, Cost], gpu: str) -> dict[str, float]:
    return {"flops": sum(c.flops for c in costs.values()), "bytes": sum(c.bytes for c in costs.values()),
            "tile_bytes": sum(c.tile_bytes for c in costs.values()),
            "time_s": sum(c.time(gpu) for c in costs.values())}


def layer_rows(B: int, N: int, C: int, fraction: float, backward: bool) -> list[dict]:
    """Model rows for one layer: eager fp32, and the kernels at each precision."""
    counts = [math.ceil(fraction * N)] * B
    rows = []
    variants = [("eager (fp32)", eager_costs(B, N, N, C, C, backward))]
    variants += [(f"triton {p}", triton_costs(B, N, N, C, C, counts, p, backward)) for p in ("ieee", "tf32", "bf16")]
    for name, costs in variants:
        row = {"variant": name, "shape": f"B{B} N=M={N} Dq=C={C} rows {fraction:.0%}",
               "pass": "fwd+bwd" if backward else "fwd", "flops": total(costs, "H100")["flops"],
               "bytes": total(costs, "H100")["bytes"], "tile_bytes": total(costs, "H100")["tile_bytes"]}
        for gpu in PEAKS:
            row[f"time_{gpu}_s"] = total(costs, gpu)["time_s"]
        rows.append(row)
    for row in rows:
        for gpu in PEAKS:
            row[f"ratio_vs_eager_{gpu}"] = rows[0][f"time_{gpu}_s"] / row[f"time_{gpu}_s"]
    return rows


def stage2_rows(backward: bool = True) -> list[dict]:
    """A stage-2 step's soft-warp losses: every SD-1.5 cross-attention layer, the paper's batch, face rows only."""
    sums: dict[str, dict] = {}
    for N, C, n_layers in STAGE2_LAYERS:
        for row in layer_rows(STAGE2_BATCH, N, C, FACE_FRACTION, backward):
            acc = sums.setdefault(row["variant"], {"variant": row["variant"], "shape": "stage-2 step, 16 layers",
                                                   "pass": row["pass"]})
            for key in ("flops", "bytes", "tile_bytes", *(f"time_{g}_s" for g in PEAKS)):
                acc[key] = acc.get(key, 0.0) + n_layers * row[key]
    rows = list(sums.values())
    for row in rows:
        for gpu in PEAKS:
            row[f"ratio_vs_eager_{gpu}"] = rows[0][f"time_{gpu}_s"] / row[f"time_{gpu}_s"]
    return rows


def predicted_for_benchmark(info: dict, backward: bool) -> dict[str, float] | None:
    """The model's times (per GPU) for one bench/test_bench_soft_warp.py row (its extra_info), or None."""
    import re

    from adaface.kernels.soft_warp import gpu_tiles

    shape = re.fullmatch(r"B(\d+) N(\d+) M(\d+) Dq(\d+) C(\d+)", info.get("shape", ""))
    if shape is None or info.get("variant") not in ("eager", "triton"):
        return None
    B, N, M, Dq, C = map(int, shape.groups())
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[info["dtype"]]
    if info["variant"] == "eager":  # the reference upcasts to fp32
        costs = eager_costs(B, N, M, Dq, C, backward)
    else:
        rows = int(info["selected_rows"])
        counts = [rows // B + (1 if b < rows % B else 0) for b in range(B)]
        precision = info.get("precision") or {4: "ieee", 2: "bf16"}[elem]
        cfg = gpu_tiles(N, M, Dq, C, precision=precision, elem=elem)
        costs = kernel_costs(B, N, M, Dq, C, counts, cfg, elem=elem, do_elem=PRECISION_BYTES[precision],
                             precision=precision, backward=backward)
    return {gpu: total(costs, gpu)["time_s"] for gpu in PEAKS}


def print_measured(paths: list[str]) -> None:
    """Measured medians of the soft-warp benchmarks (pytest-benchmark JSON) beside the model's predictions."""
    print("soft-warp loss: measured median beside the MODEL'S PREDICTION at published peaks")
    print(f"{'group':52} {'variant':8} {'device':24} {'measured ms':>11} {'A6000 model':>11} {'H100 model':>10}")
    for path in paths:
        for bench in json.loads(Path(path).read_text()).get("benchmarks", []):
            info, group = bench.get("extra_info", {}), bench.get("group") or ""
            if not group.startswith("soft_warp") or info.get("interpreted"):
                continue
            pred = predicted_for_benchmark(info, backward=group.endswith("fwd+bwd"))
            if pred is None:
                continue
            print(f"{group:52} {info['variant']:8} {str(info.get('device', '?'))[:24]:24} "
                  f"{bench['stats']['median'] * 1e3:11.3f} {pred['A6000'] * 1e3:11.3f} {pred['H100'] * 1e3:10.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the model's rows here")
    ap.add_argument("--measured", nargs="+", metavar="BENCH_JSON",
                    help="instead: print the soft-warp benchmarks' measured times beside the model's predictions")
    args = ap.parse_args(argv)
    if args.measured:
        print_measured(args.measured)
        return 0
    rows = []
    for backward in (False, True):
        rows += layer_rows(4, 4096, 320, 1.0, backward)  # the benchmark's 64² layer, every row
        rows += layer_rows(STAGE2_BATCH, 4096, 320, FACE_FRACTION, backward)
    rows += stage2_rows()
    print("MODEL ESTIMATES (published peaks, no measurement): soft-warp loss, fp32 inputs")
    print(f"{'shape':32} {'pass':7} {'variant':13} {'GFLOP':>9} {'DRAM GB':>7} {'tile GB':>7} {'A6000 ms':>9} "
          f"{'H100 ms':>9} {'x eager A6000':>13} {'x eager H100':>12}")
    for r in rows:
        print(f"{r['shape']:32} {r['pass']:7} {r['variant']:13} {r['flops'] / 1e9:9.1f} {r['bytes'] / 1e9:7.2f} "
              f"{r['tile_bytes'] / 1e9:7.2f} "
              f"{r['time_A6000_s'] * 1e3:9.2f} {r['time_H100_s'] * 1e3:9.2f} {r['ratio_vs_eager_A6000']:13.2f} "
              f"{r['ratio_vs_eager_H100']:12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"note": "model estimates, not measurements", "rows": rows}, indent=1))
    return 0


__all__ = ["Cost", "asdict", "eager_costs", "kernel_costs", "triton_costs", "layer_rows", "stage2_rows"]

if __name__ == "__main__":
    sys.exit(main())
