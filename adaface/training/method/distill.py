"""Multi-timestep face distillation on one trajectory (paper eq. 2), over generic teacher/student callables.

For timesteps t_1 > ... > t_k: the teacher and the student both predict the noise in the same x_{t_i}; the
loss is the MSE between the predictions, combined over steps. For i > 1, x_{t_i} is the teacher's predicted
x̂0 at t_{i-1} re-noised to t_i with fresh noise (DDPM q_sample), so the student learns the teacher's
behaviour along the teacher's own trajectory.

Memory: the student context (the text encoder's output) feeds every step, so instead of one backward through
k UNet graphs plus the encoder, each step back-propagates through its UNet into a detached copy of the
context, and the accumulated context gradient goes through the encoder/inverter once at the end. The result
is the gradient of the combined loss; at most one student UNet graph is alive at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> eps
StudentPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, ctx) -> eps


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM forward process: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, per sample."""
    a = _bcast(alphas_cumprod[t.to(alphas_cumprod.device)], x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def predict_x0(x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """x̂0 from a UNet output: (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) for an ε prediction, and
    sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v for a v prediction. Computed in fp32; returned in x_t's dtype."""
    a = _bcast(alphas_cumprod[t.to(alphas_cumprod.device)], x_t)
    if prediction_type == "epsilon":
        x0 = (x_t.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t.float() - (1 - a).sqrt() * pred.float()
    else:
        raise ValueError(f"prediction_type: one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    return x0.to(x_t.dtype)


def sample_num_steps(choices: Sequence[int], weights: Sequence[float], generator: torch.Generator) -> int:
    probs = torch.tensor(weights, dtype=torch.float64)
    idx = int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item())
    return int(choices[idx])


def sample_timesteps(k: int, batch: int, t_min: int, t_max: int, generator: torch.Generator) -> torch.Tensor:
    """[k, batch] long: per sample, k distinct timesteps in [t_min, t_max), in decreasing order."""
    cols = [torch.randperm(t_max - t_min, generator=generator)[:k].sort(descending=True).values + t_min
            for _ in range(batch)]
    return torch.stack(cols, dim=1)


def trajectory_timesteps(k: int, is_real: torch.Tensor, t_min: int, t_max: int,
                         generator: torch.Generator) -> torch.Tensor:
    """[k, batch] timesteps of one trajectory per sample (sample_timesteps), with the first step of every sample
    without an image (`~is_real`, a random ID) moved to t_max - 1.

    Such a sample starts from pure noise, which is x_t only at the top of the schedule; its later, smaller steps
    stay as drawn (still strictly decreasing, since every drawn step is < t_max - 1 or equal to it at i = 0).
    A real-image sample keeps its drawn t_1: its latent is noised to exactly that step.
    """
    ts = sample_timesteps(k, int(is_real.shape[0]), t_min, t_max, generator)
    ts[0, ~is_real.to(torch.bool)] = t_max - 1
    return ts


def combined_loss(step_losses: Sequence[float], weight: float) -> float:
    """The combined loss of eq. 2 from per-step MSEs: sum of weight x MSE, accumulated in step order."""
    total = 0.0
    for v in step_losses:
        total += weight * v
    return total


@dataclass
class DistillResult:
    """The per-step MSEs stay detached tensors (on the UNets' device): reading them is a device-to-host sync, so a
    caller converts them once (e.g. all micro-batches of an optimizer step together, with `losses_to_floats`)."""

    step_mse: list[torch.Tensor]  # unweighted MSE per denoising step, detached 0-dim float32 tensors
    weight: float  # weight of each step in the combined loss (combine_weight)

    @property
    def step_losses(self) -> list[float]:  # syncs
        return losses_to_floats(self.step_mse)

    @property
    def loss(self) -> float:  # syncs; the combined loss (what was back-propagated, before any external scaling)
        return combined_loss(self.step_losses, self.weight)


def losses_to_floats(values: Sequence[torch.Tensor]) -> list[float]:
    """Python floats of 0-dim tensors with one device-to-host copy (the same values float() gives one by one)."""
    if not values:
        return []
    return torch.stack([v.detach().reshape(()) for v in values]).tolist()


def combine_weight(k: int, reduction: str) -> float:
    """Weight of each step's MSE: 1 ('sum', the paper) or 1/sqrt(k) ('sqrt_k', the reference code)."""
    if reduction == "sum":
        return 1.0
    if reduction == "sqrt_k":
        return 1.0 / math.sqrt(k)
    raise ValueError(f"unknown loss reduction {reduction!r}")


def distill_trajectory(
    x_start: torch.Tensor,
    timesteps: torch.Tensor,
    teacher: NoisePredictor,
    student: StudentPredictor,
    student_context: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    *,
    reduction: str = "sum",
    backward_scale: float | None = 1.0,
    prediction_type: str = "epsilon",
) -> DistillResult:
    """Run k = len(timesteps) distillation steps from x_start (= x_{t_1}).

    `student_context` carries the graph to the trainable parameters. With `backward_scale` set, gradients
    of `backward_scale × loss` are accumulated into those parameters (and nothing is returned to
    back-propagate); with None, nothing is back-propagated (evaluation).
    Fresh noise comes from `generator` (on the CPU), so a trajectory is reproducible from its seed.

    Precision: the trajectory latents stay fp32 between steps (at t ≈ 999 the x̂0 step divides by sqrt(ᾱ_t) ≈
    0.07, which would amplify a bf16 rounding ~15x) and the context gradient is accumulated over the k steps in
    fp32; `teacher` and `student` get fp32 tensors and cast them to their UNet's dtype themselves.
    `prediction_type` is the UNets' output parameterisation (the scheduler's: "epsilon" or "v_prediction").
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    k = timesteps.shape[0]
    w = combine_weight(k, reduction)
    ctx = student_context.detach().float().requires_grad_(backward_scale is not None)
    x = x_start.float()
    losses: list[torch.Tensor] = []
    for i in range(k):
        # the schedule is indexed with the timesteps where they were drawn (the CPU), the UNets get a device copy:
        # no device-to-host sync per step
        t_host = timesteps[i]
        t = t_host.to(x.device)
        with torch.no_grad():
            eps_t = teacher(x, t)
        eps_s = student(x, t, ctx)
        mse = F.mse_loss(eps_s.float(), eps_t.float())
        if backward_scale is not None:
            (mse * (w * backward_scale)).backward()
        losses.append(mse.detach())  # no .item()/float(): that would sync the host on every step
        if i + 1 < k:
            with torch.no_grad():
                x0 = predict_x0(x, eps_t, t_host, alphas_cumprod, prediction_type)
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
                x = q_sample(x0, timesteps[i + 1], noise, alphas_cumprod)
    if backward_scale is not None and ctx.grad is not None:
        student_context.backward(ctx.grad.to(student_context.dtype))
    return DistillResult(step_mse=losses, weight=w)
