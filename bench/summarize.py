"""Print a compact table from pytest-benchmark JSON files: one row per benchmark, grouped.

    python bench/summarize.py                          # runs/bench.json, which `pytest bench/` writes
    python bench/summarize.py bench.json [more.json ...]

Ratios are against the row whose `extra_info["baseline"]` is true in the same group (the eager PyTorch
reference unless a benchmark says otherwise). Rows of Triton kernels run through the interpreter (a CPU
without a GPU) are marked "[interp.]": their time is the interpreter's, not the kernel's. Several files are
merged group by group: pass only files written on the same machine in one session (bench/device_check.sh
runs the torch.compile rows in a separate pytest process, after the others, and merges them here).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "runs" / "bench.json"


def _fmt_time(seconds: float) -> str:
    for unit, factor in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if seconds * factor >= 1.0 or unit == "us":
            return f"{seconds * factor:8.3f} {unit}"
    return str(seconds)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:9.1f} MiB"


def main(paths: list[str]) -> int:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        if not Path(path).is_file():
            print(f"summarize: {path}: no such file; `pytest bench/` writes {DEFAULT_JSON} "
                  "(or pass --benchmark-json FILE to it)", file=sys.stderr)
            return 2
        with open(path) as fh:
            data = json.load(fh)
        for bench in data.get("benchmarks", []):
            groups[bench.get("group") or bench["fullname"].split("::")[0]].append(bench)
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
        base_t = base["stats"]["median"] if base else None
        base_mem = base.get("extra_info", {}).get("peak_bytes") if base else None
        device = benches[0].get("extra_info", {}).get("device", "?")
        print(f"\n## {group}  [{device}]")
        header = ("benchmark", "median", "x base", "GB/s", "TFLOP/s", "peak mem", "mem/base")
        print("{:50s} {:>11s} {:>7s} {:>8s} {:>8s} {:>13s} {:>8s}".format(*header))
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            info = b.get("extra_info", {})
            t = b["stats"]["median"]
            speed = f"{base_t / t:6.2f}x" if base_t else "    -  "
            gbs = f"{info['bytes'] / t / 1e9:8.1f}" if info.get("bytes") else "       -"
            tfl = f"{info['flops'] / t / 1e12:8.2f}" if info.get("flops") else "       -"
            mem = info.get("peak_bytes")
            mem_ratio = f"{mem / base_mem:8.3f}" if mem is not None and base_mem else "       -"
            name = b["name"][:36] + " [interp.]" if info.get("interpreted") else b["name"][:50]
            print(f"{name:50s} {_fmt_time(t):>11s} {speed:>7s} {gbs} {tfl} {_fmt_bytes(mem):>13s} {mem_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(DEFAULT_JSON)]))
