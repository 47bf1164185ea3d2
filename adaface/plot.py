"""`python -m adaface.plot RUN_DIR`: a picture of a training run's `metrics.jsonl`.

Three panels over the optimizer step: every loss term the step records carry (each numeric key named `loss` or
starting with `loss_`, raw and smoothed; the legends sit beside the panels, not on the curves), then Prodigy's
`d`, then the learning rate `lr`, each on its own axis. In a stage-2 run the mixed-in stage-1 steps (records with
`loss_stage1`) are a series of their own: `loss` is drawn over the composition steps only, so the two step kinds'
losses do not zig-zag into one curve. The attention expansions (`event: expansion` records, paper §2.2) are marked
on every panel. Written with matplotlib's Agg backend (no display
needed) to RUN_DIR/metrics.png unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cli import OptionError
from ._command import command_errors, command_parser

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
STAGE1_KEY = "loss_stage1"  # what a stage-2 run's mixed-in stage-1 steps record


@dataclass
class Run:
    """What the plot needs from a metrics log: per-key step series and the expansion events."""

    path: Path
    series: dict[str, tuple[list[int], list[float]]]
    expansions: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # legend names where they differ from the key


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("plot", "Plot a training run's loss terms (raw and smoothed), Prodigy's d and the learning "
                       "rate, with the attention expansions marked.")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help=f"training output folder holding {METRICS_NAME} (or the {METRICS_NAME} file itself)")
    p.add_argument("--out", metavar="PNG", help=f"image to write (default: RUN_DIR/{PLOT_NAME})")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="weight of the exponential moving average drawn over each loss, in [0, 1)")
    p.add_argument("--extra-key", action="append", default=[], metavar="KEY",
                   help="another numeric step key to draw with the losses (e.g. grad_norm); repeatable")
    return p


def is_loss_key(key: str) -> bool:
    return key == "loss" or key.startswith("loss_")


def _number(value: Any) -> float | None:
    # bool is an int to Python but never a metric; NaN/inf are kept (json writes them) and drawn as gaps.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def metrics_path(run_dir: str) -> Path:
    from ._file_checks import check_readable

    if not run_dir or not run_dir.strip():
        raise OptionError("RUN_DIR: an empty path is not a run folder (name the folder)")
    path = Path(run_dir).expanduser()
    if path.is_file():
        check_readable(path, "RUN_DIR", run_dir)
        return path
    if not path.is_dir():
        raise OptionError(f"RUN_DIR {run_dir}: folder not found")
    check_readable(path, "RUN_DIR", run_dir, "folder")
    if not (path / METRICS_NAME).is_file():
        raise OptionError(f"RUN_DIR {run_dir}: no {METRICS_NAME} in it (is it a training --output-dir?)")
    check_readable(path / METRICS_NAME, "RUN_DIR", f"{run_dir}: {METRICS_NAME}")
    return path / METRICS_NAME


def read_run(path: Path, extra_keys: list[str] = ()) -> Run:
    """Parse the log: the last record per step wins (a resumed run's log never repeats one, a hand-joined may)."""
    try:
        lines = path.read_text(errors="replace").splitlines()  # a garbled byte spoils its line only
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"RUN_DIR {path}: cannot read it ({type(e).__name__}: {e})") from e
    steps: dict[int, dict[str, float]] = {}
    expansions, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1  # garbage, or a torn last line from a killed process
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            skipped += 1
            continue
        if rec.get("event") == "expansion":
            expansions.append(rec)
        elif rec.get("event") == "step":
            steps[rec["step"]] = {k: v for k, v in ((k, _number(v)) for k, v in rec.items()) if v is not None}
    if not steps:
        what = "is empty" if not any(line.strip() for line in lines) else (
            f"holds no step records ({len(lines)} lines, {skipped} not JSON records with a step)")
        raise OptionError(f"RUN_DIR {path}: {what}; expected JSON lines with \"event\": \"step\"")
    labels = {}
    kinds = {STAGE1_KEY in rec for rec in steps.values()}
    if kinds == {True, False}:  # stage 2 with mixed-in stage-1 steps: `loss` of each kind apart
        for rec in steps.values():
            if STAGE1_KEY in rec:
                rec.pop("loss", None)
        labels = {"loss": "loss (composition steps)", STAGE1_KEY: f"{STAGE1_KEY} (stage-1 steps)"}
    keys = sorted({k for rec in steps.values() for k in rec if is_loss_key(k)}, key=lambda k: (k != "loss", k))
    missing = [k for k in extra_keys if not any(k in rec for rec in steps.values())]
    if missing:
        raise OptionError(f"--extra-key {missing[0]}: no step record of {path} has a numeric {missing[0]!r}")
    wanted = [*keys, *[k for k in extra_keys if k not in keys], "d", "lr"]
    series = {}
    for key in wanted:
        xs = [s for s in sorted(steps) if key in steps[s]]
        if xs:
            series[key] = (xs, [steps[s][key] for s in xs])
    if not any(is_loss_key(k) or k in extra_keys for k in series):
        raise OptionError(f"RUN_DIR {path}: its step records hold no numeric 'loss' or 'loss_*' values")
    return Run(path, series, sorted(expansions, key=lambda e: e["step"]), skipped, labels)


def smooth(values: list[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average; non-finite values are skipped (and stay gaps)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _log_scale_fits(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def _mark_expansions(ax: Any, expansions: list[dict], label: bool) -> None:
    for k, e in enumerate(expansions):
        ax.axvline(e["step"], color="0.35", linestyle="--", linewidth=1,
                   label="expansion" if label and k == 0 else None)
        if label:
            text = str(e.get("stage") or e.get("multipliers") or "")
            ax.annotate(f" {text}", (e["step"], 1), xycoords=("data", "axes fraction"), va="top", ha="left",
                        fontsize=8, color="0.25", rotation=90)


def plot(run: Run, out: Path, smoothing: float = 0.9, extra_keys: list[str] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_d, ax_lr) = plt.subplots(3, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 1.3, 1.3))
    loss_keys = [k for k in run.series if is_loss_key(k) or k in extra_keys]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(loss_keys):
        xs, ys = run.series[key]
        color = colors[i % len(colors)]
        ax_loss.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        ax_loss.plot(xs, smooth(ys, smoothing), color=color, linewidth=1.8,
                     label=f"{run.labels.get(key, key)} (smoothed)")
    if all(_log_scale_fits(run.series[k][1]) for k in loss_keys):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    n_steps = len({x for xs, _ in run.series.values() for x in xs})
    ax_loss.set_title(f"{run.path.parent.name or run.path.name}: {n_steps} steps"
                      f" (faint: raw, bold: EMA {smoothing:g})")
    _mark_expansions(ax_loss, run.expansions, label=True)

    for ax, key, label, color in ((ax_d, "d", "Prodigy d", "tab:purple"), (ax_lr, "lr", "lr", "tab:green")):
        if key in run.series:
            xs, ys = run.series[key]
            ax.plot(xs, ys, color=color, label=label)
            if key == "d" and _log_scale_fits(ys) and max(ys) > 10 * min(ys):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {key} in the step records", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        _mark_expansions(ax, run.expansions, label=False)
    for ax in (ax_loss, ax_d, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax_lr.set_xlabel("optimizer step")
    fig.subplots_adjust(left=0.08, right=0.72, top=0.94, bottom=0.08, hspace=0.12)  # the right margin: legends
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def check_args(args: argparse.Namespace) -> tuple[Path, Path]:
    if not 0 <= args.smoothing < 1:
        raise OptionError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    path = metrics_path(args.run_dir)
    out = Path(args.out).expanduser() if args.out else path.parent / PLOT_NAME
    from ._file_checks import check_writable_file

    if args.out is not None:
        check_writable_file(args.out, "--out")
    if out.suffix.lower() != ".png":
        raise OptionError(f"--out {args.out}: the plot is a PNG; give a .png path")
    if not out.parent.is_dir():
        raise OptionError(f"--out {args.out}: folder {out.parent} not found")
    if args.out is None:
        check_writable_file(str(out), "--out")  # the default, inside RUN_DIR
    return path, out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with command_errors(parser):
        path, out = check_args(args)
        run = read_run(path, args.extra_key)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error('matplotlib is not installed: pip install "adaface[plot]" (or pip install matplotlib)')
    with command_errors(parser, os_errors=True, where=f"--out {out}"):  # a full disk
        plot(run, out, args.smoothing, args.extra_key)
    note = f" ({run.skipped_lines} unreadable line(s) skipped)" if run.skipped_lines else ""
    print(f"wrote {out}: {', '.join(run.series)} over {len(run.series[next(iter(run.series))][0])} steps, "
          f"{len(run.expansions)} expansion(s){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
