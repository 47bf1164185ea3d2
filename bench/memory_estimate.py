"""Full-size GPU memory of a stage-1 and a stage-2 training step, estimated on the CPU without allocating.

    python bench/memory_estimate.py                          # both stages, the paper's settings, and a sweep
    python bench/memory_estimate.py --stage stage1 --batch 4 --checkpointing on --json rows.json

Every model is built at full size on the `meta` device (SD-1.5 UNet and text encoder, Arc2Face's UNet and
encoder, a CLIP-L-sized Prompt Inverter at the paper's final multipliers 8,8,8,4,...,4, the SD-1.5 VAE where
real images are encoded), and the trainers' own per-micro-batch loss functions run on it, forward and backward
(`adaface.training.stage1.stage1_loss`, `adaface.training.stage2.stage2_loss`), while
`adaface.testing.meta_memory.LiveBytes` follows every tensor they create. Attention is counted as the fused
GPU kernels hold it (flash / memory-efficient attention keep the output and a log-sum-exp, not the N×N map),
and the Prodigy state from its definition. A row is

    peak = weights (frozen models, the trainable inverter) + optimizer state + the step's own peak,

the last being the micro-batch's activations plus the gradients it accumulates (`activations_gib` and
`gradients_gib`). The CUDA context (several hundred MiB) and the allocator's rounding and fragmentation come on
top of what `torch.cuda.max_memory_allocated` reports, and are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adaface.testing.meta_memory import LiveBytes, fused_sdpa, module_bytes, prodigy_state_bytes, tensor_bytes

ROOT = Path(__file__).resolve().parents[1]
PAPER_MULTIPLIERS = (8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4, 4)
GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    stage: str
    batch: int
    resolution: int
    dtype: str
    checkpointing: bool
    peak_gib: float
    weights_gib: float
    optimizer_gib: float
    activations_gib: float
    gradients_gib: float
    slice_p: int
    seconds: float


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    from adaface.testing.tiny_models import save_tiny_tokenizer

    return CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp / "tokenizer")))


@functools.lru_cache(maxsize=2)
def stage1_models(dtype: torch.dtype, resolution: int, with_vae: bool = False):
    """The stage-1 models at full size on `meta`: frozen student and teacher in `dtype`, fp32 inverter (built
    once per process: the rows of a sweep share them, each setting its own gradient checkpointing)."""
    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.full_size import clip_l_text_encoder, frozen, sd15_unet, sd15_vae
    from adaface.testing.tiny_models import sd15_scheduler
    from adaface.training.stage1 import Stage1Models

    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp))
    with torch.device("meta"):
        unet, teacher_unet = sd15_unet(), sd15_unet()
        sd_text, a2f_text, inv_text = (clip_l_text_encoder(tok) for _ in range(3))
        vae = sd15_vae() if with_vae else None
        teacher = Arc2Face(a2f_text, tok, teacher_unet)
        inverter = PromptInverter(inv_text, tokenizer=tok)
        inverter.expand(list(PAPER_MULTIPLIERS), noise_ratio=0.1)
    for m in (unet, sd_text, teacher) + ((vae,) if vae is not None else ()):
        frozen(m, dtype)
    inverter.train()
    return Stage1Models(tok, sd_text, unet, teacher, inverter, sd15_scheduler().alphas_cumprod.float(), vae,
                        0.18215, resolution // 8)


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def set_checkpointing(unet: torch.nn.Module, on: bool) -> None:
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


@contextlib.contextmanager
def accumulated_gradients(module: torch.nn.Module) -> Iterator[int]:
    """Within the block the trainable parameters hold gradients made before it (so not counted by a tracker
    started inside): the measured micro-batch is then one that accumulates into them, as every micro-batch but
    the first of a step does. Yields their bytes."""
    params = _trainable(module)
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        yield tensor_bytes(p.grad for p in params)
    finally:
        for p in params:
            p.grad = None


def measure(stage: str, batch: int, resolution: int, dtype: str, checkpointing: bool, slice_p: int,
            frozen_modules: list[torch.nn.Module], inverter: torch.nn.Module,
            micro_batch: Callable[[], object]) -> Row:
    """Run `micro_batch()` (forward and backward) under the tracker, with gradients already accumulated; the
    row's peak is weights + optimizer state + gradients + the micro-batch's own peak."""
    t0 = time.perf_counter()
    with accumulated_gradients(inverter) as grads:
        tracker = LiveBytes()
        with fused_sdpa(), tracker:
            micro_batch()
    weights = module_bytes(*frozen_modules, inverter)
    optimizer = prodigy_state_bytes(_trainable(inverter), slice_p=slice_p)
    return Row(stage, batch, resolution, dtype, checkpointing, (weights + optimizer + grads + tracker.peak) / GIB,
               weights / GIB, optimizer / GIB, tracker.peak / GIB, grads / GIB, slice_p, time.perf_counter() - t0)


def estimate_stage1(batch: int, *, resolution: int = 512, dtype: str = "bf16", checkpointing: bool = True,
                    slice_p: int = 1, denoise_steps: int = 1) -> Row:
    """One stage-1 micro-batch of random IDs (a k-step trajectory, one student UNet graph at a time)."""
    from adaface.training.data import FaceBatch, random_ids
    from adaface.training.stage1 import DistillSettings, stage1_loss

    m = stage1_models(DTYPES[dtype], resolution)
    set_checkpointing(m.unet, checkpointing)
    g = torch.Generator().manual_seed(0)
    faces = FaceBatch(arcface=random_ids(batch, g), is_real=torch.zeros(batch, dtype=torch.bool), images=None)
    settings = DistillSettings(denoise_steps=(denoise_steps,), denoise_step_weights=(1.0,))
    return measure("stage1", batch, resolution, dtype, checkpointing, slice_p, [m.unet, m.text_encoder, m.teacher],
                   m.inverter, lambda: stage1_loss(m, faces, g, settings=settings, backward_scale=1.0))


ESTIMATORS = {"stage1": estimate_stage1}


def largest_fitting(rows: list[Row], stage: str, checkpointing: bool, budget_gib: float) -> int | None:
    fit = [r.batch for r in rows if r.stage == stage and r.checkpointing == checkpointing and r.peak_gib <= budget_gib]
    return max(fit) if fit else None


def format_table(rows: list[Row]) -> str:
    head = (f"{'stage':7} {'batch':>5} {'res':>4} {'dtype':5} {'ckpt':4} {'peak':>7} {'weights':>8} {'optim':>6} "
            f"{'activ':>6} {'grads':>6}  (GiB)")
    lines = [head]
    for r in rows:
        lines.append(f"{r.stage:7} {r.batch:5d} {r.resolution:4d} {r.dtype:5} {'on' if r.checkpointing else 'off':4} "
                     f"{r.peak_gib:7.2f} {r.weights_gib:8.2f} {r.optimizer_gib:6.2f} {r.activations_gib:6.2f} "
                     f"{r.gradients_gib:6.2f}")
    return "\n".join(lines)


def _batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("stage1", "stage2", "both"), default="both")
    p.add_argument("--batch", type=_batches, default=None,
                   help="comma-separated batch sizes (default: a sweep 1,2,4,8 for stage 1 and 1,2,3,4,6 for stage 2)")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="gradient checkpointing of the student UNet")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="frozen models' weights and activations")
    p.add_argument("--slice-p", type=int, default=1, help="Prodigy's slice_p (1: the full state)")
    p.add_argument("--json", default=None, metavar="F", help="also write the rows to F (a JSON list)")
    return p


DEFAULT_BATCHES = {"stage1": [1, 2, 4, 8], "stage2": [1, 2, 3, 4, 6]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resolution < 64 or args.resolution % 64:
        print(f"memory_estimate: --resolution must be a multiple of 64, got {args.resolution}", file=sys.stderr)
        return 2
    if args.slice_p < 1:
        print(f"memory_estimate: --slice-p must be >= 1, got {args.slice_p}", file=sys.stderr)
        return 2
    stages = [s for s in ESTIMATORS if args.stage in (s, "both")]
    ckpts = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    rows: list[Row] = []
    for stage in stages:
        for ck in ckpts:
            for b in args.batch or DEFAULT_BATCHES[stage]:
                rows.append(ESTIMATORS[stage](b, resolution=args.resolution, dtype=args.dtype, checkpointing=ck,
                                              slice_p=args.slice_p))
                print(format_table(rows[-1:]).splitlines()[1], f"({rows[-1].seconds:.0f} s)", flush=True)
    print()
    print(format_table(rows))
    for stage in stages:
        for ck in ckpts:
            fits = {budget: largest_fitting(rows, stage, ck, budget) for budget in (24.0, 48.0)}
            print(f"{stage}, checkpointing {'on' if ck else 'off'}: largest measured batch within 24 GiB: "
                  f"{fits[24.0]}, within 48 GiB: {fits[48.0]}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
