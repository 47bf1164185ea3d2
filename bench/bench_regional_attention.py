"""Benchmark regional cross-attention (adaface.models.regional_attention): its cost and its out-of-region mass.

    python bench/bench_regional_attention.py                 # tiny SD-1.5 pipeline, two subjects, CPU or CUDA
    python bench/bench_regional_attention.py --runs 9 --json regional.json

Two subjects (random 16-vector embeddings) in one prompt, `z` confined to the left half and `y` to the right.
In one process, alternating, it times (median of --runs) the whole pipeline call (--steps steps, guidance 2,
--size² pixels) and a single UNet forward on the guided batch, once with the stock processors and once with the
regional processors installed, so both see the same machine state. It also records, over every cross-attention
layer and both subjects, the largest attention probability mass that a latent position outside a subject's
region gives to that subject's 16 tokens (it must be exactly 0), and the smallest such mass inside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _median_seconds(fn, runs: int, sync) -> float:
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per variant (the median is reported)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the timed pipeline call")
    p.add_argument("--size", type=int, default=64, help="image height and width in pixels (a multiple of 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    from adaface._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    if args.runs < 1 or args.steps < 1 or args.size < 8 or args.size % 8:
        p.error("--runs and --steps must be at least 1, --size a positive multiple of 8")

    from diffusers import StableDiffusionPipeline

    from adaface.models.regional_attention import Region, RegionalAttention, layer_grid
    from adaface.models.subject_prompt import encode_subjects_prompt
    from adaface.models.unet_feature_capture import UNetFeatureCapture
    from adaface.testing.tiny_models import save_tiny_sd15

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(str(save_tiny_sd15(Path(tmp) / "sd15")),
                                                       safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    subjects = {w: torch.randn(16, 512, generator=g).to(device) for w in ("z", "y")}
    regions = {"z": Region.parse("left"), "y": Region.parse("right")}
    with torch.no_grad():
        embeds, slots = encode_subjects_prompt(pipe.tokenizer, pipe.text_encoder, "a photo of z and y in the forest",
                                               subjects)
        negative, _ = pipe.encode_prompt("", device, 1, False)
    latent_size = (args.size // pipe.vae_scale_factor, args.size // pipe.vae_scale_factor)

    def run_pipe():
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=args.steps,
             guidance_scale=2.0, height=args.size, width=args.size, output_type="latent",
             generator=torch.Generator().manual_seed(1))

    x = torch.randn(2, 4, *latent_size, generator=torch.Generator().manual_seed(2)).to(device)
    ctx = torch.cat([negative, embeds])
    t = torch.tensor(500, device=device)

    def run_unet():
        with torch.no_grad():
            pipe.unet(x, t, encoder_hidden_states=ctx)

    timings: dict[str, list[float]] = {"pipeline_plain": [], "pipeline_regional": [], "unet_plain": [],
                                       "unet_regional": []}
    run_pipe(), run_unet()  # warm-up
    regional = None
    for _ in range(args.runs):  # alternate, so drifts in machine load hit both variants alike
        for mode in ("plain", "regional"):
            if mode == "regional":
                regional = RegionalAttention(pipe.unet, regions)
                regional.configure(slots, 16, latent_size, guided=True)
            timings[f"pipeline_{mode}"].append(_median_seconds(run_pipe, 1, sync))
            timings[f"unet_{mode}"].append(_median_seconds(run_unet, 3, sync))
            if regional is not None:
                regional.remove()
                regional = None

    # out-of-region mass, every cross-attention layer, the subject rows of the guided batch
    capture = UNetFeatureCapture(pipe.unet)
    regional = RegionalAttention(pipe.unet, regions)
    regional.configure(slots, 16, latent_size, guided=True)
    with torch.no_grad(), capture.recording() as features:
        pipe.unet(x, t, encoder_hidden_states=ctx)
        outside_max, inside_min, row_error = 0.0, float("inf"), 0.0
        for f in features.values():
            probs = f.maps()[1:]  # the subject prompt's row
            h, w = layer_grid(f.num_positions, latent_size)
            row_error = max(row_error, (probs.sum(-1) - 1).abs().max().item())
            for word, start in slots.items():
                inside = regions[word].cells(h, w).to(device)
                mass = probs[..., start:start + 16].sum(-1)
                outside_max = max(outside_max, mass[..., ~inside].max().item())
                inside_min = min(inside_min, mass[..., inside].min().item())
    regional.remove()
    capture.remove()

    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "size": args.size, "steps": args.steps, "runs": args.runs, "layers": len(features),
        "median_seconds": med,
        "pipeline_overhead": med["pipeline_regional"] / med["pipeline_plain"] - 1,
        "unet_overhead": med["unet_regional"] / med["unet_plain"] - 1,
        "out_of_region_mass_max": outside_max,
        "in_region_mass_min": inside_min,
        "row_sum_error_max": row_error,
    }
    print(f"{result['device']}, tiny SD-1.5, {args.size}x{args.size}, {args.steps} steps, median of {args.runs}:")
    print(f"  pipeline  plain {med['pipeline_plain'] * 1e3:8.1f} ms   regional {med['pipeline_regional'] * 1e3:8.1f} ms"
          f"   ({result['pipeline_overhead']:+.1%})")
    print(f"  UNet      plain {med['unet_plain'] * 1e3:8.2f} ms   regional {med['unet_regional'] * 1e3:8.2f} ms"
          f"   ({result['unet_overhead']:+.1%})")
    print(f"  out-of-region attention mass, max over {len(features)} layers and 2 subjects: {outside_max!r}; "
          f"smallest in-region mass {inside_min:.3g}; largest |row sum - 1| {row_error:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if outside_max == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
