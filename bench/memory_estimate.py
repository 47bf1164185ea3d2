"""Full-size GPU memory of a stage-1 and a stage-2 training step, estimated on the CPU without allocating.

    python bench/memory_estimate.py                          # both stages, the paper's settings, and a sweep
    python bench/memory_estimate.py --stage stage1 --batch 4 --checkpointing on --json rows.json

Every model is built at full size on the `meta` device (SD-1.5 UNet, VAE and text encoder, Arc2Face's UNet and
encoder, a CLIP-L-sized Prompt Inverter at the paper's final multipliers 8,8,8,4,...,4), and the trainers' own
per-micro-batch functions run on it, forward and backward (`adaface.training.method.stage1.stage1_loss` and
`adaface.training.method.composition_step.composition_step` with the paper's stage-2 options), while
`adaface.testing.meta_memory.LiveBytes` follows every tensor they create. Attention is counted as the fused GPU
kernels hold it (flash / memory-efficient attention keep the output and a log-sum-exp, not the N×N map), the
fused losses through their ops' fakes, and the Prodigy state from its definition. A row is

    peak = weights (frozen models and the inverter) + optimizer state + gradients + the micro-batch's own peak,

the micro-batch being one that accumulates into existing gradients (every micro-batch of a step but the first).
Stage 1 runs one denoising step per trajectory: a trajectory holds one student UNet graph at a time, so its peak
does not grow with k (k = 3 gives the same peak to 1 MiB). The peak is affine in the batch size, so the largest
batch fitting a budget is predicted from two rows and then measured. The CUDA context (several hundred MiB) and
the allocator's rounding and fragmentation come on top of what `torch.cuda.max_memory_allocated` reports, and
are not counted; the frozen models' activations are counted in `--dtype`, the inverter's in fp32 (autocast does
not act on `meta`), a small overestimate.
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
from adaface.testing.step_benchmark import PAPER_MULTIPLIERS

ROOT = Path(__file__).resolve().parents[1]
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
    from adaface.training.method.stage1 import Stage1Models

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
    from adaface.training.engine.data import FaceBatch, random_ids
    from adaface.training.method.stage1 import DistillSettings, stage1_loss

    m = stage1_models(DTYPES[dtype], resolution)
    set_checkpointing(m.unet, checkpointing)
    g = torch.Generator().manual_seed(0)
    faces = FaceBatch(arcface=random_ids(batch, g), is_real=torch.zeros(batch, dtype=torch.bool), images=None)
    settings = DistillSettings(denoise_steps=(denoise_steps,), denoise_step_weights=(1.0,))
    return measure("stage1", batch, resolution, dtype, checkpointing, slice_p, [m.unet, m.text_encoder, m.teacher],
                   m.inverter, lambda: stage1_loss(m, faces, g, settings=settings, backward_scale=1.0))


def stage2_settings(backend: str = "triton"):
    """The paper's stage-2 options (training/configs/stage2_paper.json), with the fused losses' GPU backend: its
    ops' fakes count their outputs and saved state (the PyTorch references would materialise N×N maps)."""
    import dataclasses

    from adaface.training.engine.config import load_config_file
    from adaface.training.method.stage2 import Stage2Config, composition_config

    cfg = Stage2Config(**load_config_file(ROOT / "training" / "configs" / "stage2_paper.json", Stage2Config))
    return dataclasses.replace(composition_config(cfg), backend=backend)


def estimate_stage2(batch: int, *, resolution: int = 512, dtype: str = "bf16", checkpointing: bool = True,
                    slice_p: int = 1) -> Row:
    """One stage-2 composition micro-batch: `batch` subjects × 4 prompts sharing a noisy latent, the feature
    capture on the selected layers, the delta and face-preserving losses, backward."""
    from adaface.models.unet_feature_capture import UNetFeatureCapture
    from adaface.training.engine.data import random_ids
    from adaface.training.method.composition_step import (
        CompositionBatch,
        CompositionModels,
        capture_layers,
        composition_step,
    )
    from adaface.training.method.compositions import CompositionPool

    s1 = stage1_models(DTYPES[dtype], resolution, with_vae=True)
    set_checkpointing(s1.unet, checkpointing)
    comp_cfg = stage2_settings()
    capture = UNetFeatureCapture(s1.unet, capture_layers(s1.unet, comp_cfg))
    m = CompositionModels(s1.tokenizer, s1.text_encoder, s1.unet, capture, s1.teacher, s1.inverter, s1.vae,
                          s1.vae_scale, s1.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    pool = CompositionPool.default()

    def micro_batch() -> None:
        images = torch.zeros(batch, 3, resolution, resolution, device="meta")
        masks = torch.zeros(batch, 1, resolution, resolution, device="meta")
        faces = CompositionBatch(random_ids(batch, g), images, masks, [None] * batch)
        composition_step(m, faces, comp_cfg, pool, g).loss.backward()

    try:
        return measure("stage2", batch, resolution, dtype, checkpointing, slice_p,
                       [s1.unet, s1.text_encoder, s1.teacher, s1.vae], s1.inverter, micro_batch)
    finally:
        capture.remove()


ESTIMATORS = {"stage1": estimate_stage1, "stage2": estimate_stage2}


def estimated_peak_gib(stage: str, batch: int, *, checkpointing: bool, dtype: str = "bf16") -> float:
    """The estimate that the step benchmarks print next to `torch.cuda.max_memory_allocated` on a GPU."""
    return ESTIMATORS[stage](batch, checkpointing=checkpointing, dtype=dtype).peak_gib


def largest_batch(estimator: Callable[..., Row], budget_gib: float, measured: list[Row], max_batch: int = 256,
                  **kw) -> tuple[int | None, list[Row]]:
    """The largest batch whose estimated peak fits `budget_gib`, and the rows measured to find it.

    A step's peak is affine in the batch size (weights and optimizer state are fixed, activations grow with
    each sample), so the two smallest measured batches predict the answer; it is then measured, with its
    neighbours, until the batch fits and the next one does not."""
    rows = sorted(measured, key=lambda r: r.batch)
    known = {r.batch: r for r in rows}

    def at(b: int) -> Row:
        if b not in known:
            known[b] = estimator(b, **kw)
            new.append(known[b])
        return known[b]

    new: list[Row] = []
    if len(rows) < 2:
        rows = [at(1), at(2)]
    (b0, p0), (b1, p1) = (rows[0].batch, rows[0].peak_gib), (rows[1].batch, rows[1].peak_gib)
    slope = (p1 - p0) / (b1 - b0)
    guess = max_batch if slope <= 0 else int((budget_gib - p0) / slope) + b0
    b = min(max(guess, 1), max_batch)
    for _ in range(8):
        if at(b).peak_gib > budget_gib:
            if b == 1:
                return None, new
            b -= 1
        elif b < max_batch and at(b + 1).peak_gib <= budget_gib:
            b += 1
        else:
            return b, new
    return (b if at(b).peak_gib <= budget_gib else None), new


def format_table(rows: list[Row]) -> str:
    head = (f"{'stage':7} {'batch':>5} {'res':>4} {'dtype':5} {'ckpt':4} {'peak':>7} {'weights':>8} {'optim':>6} "
            f"{'activ':>6} {'grads':>6}  (GiB)")
    lines = [head]
    for r in rows:
        lines.append(f"{r.stage:7} {r.batch:5d} {r.resolution:4d} {r.dtype:5} {'on' if r.checkpointing else 'off':4} "
                     f"{r.peak_gib:7.2f} {r.weights_gib:8.2f} {r.optimizer_gib:6.2f} {r.activations_gib:6.2f} "
                     f"{r.gradients_gib:6.2f}")
    return "\n".join(lines)


MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
MAX_BATCH = 4096


def _batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"batch sizes must be from 1 to {MAX_BATCH}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("stage1", "stage2", "both"), default="both")
    p.add_argument("--batch", type=_batches, default=None,
                   help="comma-separated batch sizes to measure (default: 1 and the paper's batch, 4 for stage 1 and 3 "
                        "for stage 2); then the largest batch fitting 24 and 48 GiB is searched for and measured")
    p.add_argument("--no-search", action="store_true", help="measure the given batches only")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="gradient checkpointing of the student UNet")
    p.add_argument("--resolution", type=int, default=512,
                   help=f"training resolution: a multiple of 64 from {MIN_RESOLUTION} to {MAX_RESOLUTION}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="frozen models' weights and activations")
    p.add_argument("--slice-p", type=int, default=1, help="Prodigy's slice_p (1: the full state)")
    p.add_argument("--json", default=None, metavar="F", help="also write the rows to F (a JSON list)")
    return p


DEFAULT_BATCHES = {"stage1": [1, 4], "stage2": [1, 3]}  # 1 and the paper's batch
BUDGETS_GIB = (24.0, 48.0)  # an RTX 3090/4090; an RTX A6000


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from adaface._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    if not MIN_RESOLUTION <= args.resolution <= MAX_RESOLUTION or args.resolution % 64:
        print(f"memory_estimate: --resolution must be a multiple of 64 from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
              f"got {args.resolution}", file=sys.stderr)
        return 2
    if args.json is not None:  # checked before minutes of estimates, not after
        from adaface._cli import OptionError
        from adaface._file_checks import check_writable_file

        try:
            check_writable_file(args.json, "--json")
        except OptionError as e:
            print(f"memory_estimate: {e}", file=sys.stderr)
            return 2
    if args.slice_p < 1:
        print(f"memory_estimate: --slice-p must be >= 1, got {args.slice_p}", file=sys.stderr)
        return 2
    stages = [s for s in ESTIMATORS if args.stage in (s, "both")]
    ckpts = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    kw = {"resolution": args.resolution, "dtype": args.dtype, "slice_p": args.slice_p}
    rows: list[Row] = []
    fits: list[str] = []

    def show(new: list[Row]) -> None:
        for r in new:
            print(format_table([r]).splitlines()[1], f"({r.seconds:.0f} s)", flush=True)
        rows.extend(new)

    for stage in stages:
        for ck in ckpts:
            show([ESTIMATORS[stage](b, checkpointing=ck, **kw) for b in args.batch or DEFAULT_BATCHES[stage]])
            if args.no_search:
                continue
            for budget in BUDGETS_GIB:
                mine = [r for r in rows if r.stage == stage and r.checkpointing == ck]
                best, new = largest_batch(ESTIMATORS[stage], budget, mine, checkpointing=ck, **kw)
                show(new)
                fits.append(f"{stage}, checkpointing {'on' if ck else 'off'}: the largest batch within {budget:g} GiB "
                            f"is {best}")
    rows.sort(key=lambda r: (stages.index(r.stage), not r.checkpointing, r.batch))
    print()
    print(format_table(rows))
    print("\n".join(fits))
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        except OSError as e:
            print(f"memory_estimate: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
