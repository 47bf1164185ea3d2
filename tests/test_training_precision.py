"""Stage-1 numerics (issue: trajectory precision): fp32 trajectory latents with bf16 UNets, the context gradient
accumulated in fp32 over the k steps, and the scheduler's prediction_type (epsilon, v_prediction, else an error)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adaface.testing.tiny_models import sd15_scheduler
from adaface.training.method.distill import distill_trajectory, predict_x0, q_sample


def _ac() -> torch.Tensor:
    return sd15_scheduler().alphas_cumprod.float()


def test_predict_x0_inverts_both_parameterisations():
    ac = _ac()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 3])
    xt = q_sample(x0, t, eps, ac)
    a = ac[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    # fp32 tolerance: at t = 999 the epsilon form divides by sqrt(ᾱ) ≈ 0.068
    torch.testing.assert_close(predict_x0(xt, eps, t, ac, "epsilon"), x0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(predict_x0(xt, v, t, ac, "v_prediction"), x0, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(xt, eps, t, ac, "sample")


def test_v_prediction_trajectory_follows_the_teacher_x0():
    """A teacher that outputs the exact v of a known x0: every later x_t is that x0 re-noised (fp32 tolerance)."""
    ac = _ac()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 4, 4, generator=g)
    ts = torch.tensor([[900, 800], [500, 400], [100, 50]])
    x_start = q_sample(x0, ts[0], torch.randn(x0.shape, generator=g), ac)
    seen: list[torch.Tensor] = []

    def teacher(x, t):
        seen.append(x.clone())
        a = ac[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def student(x, t, ctx):
        return x * ctx.mean()

    ctx = torch.ones(2, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    distill_trajectory(x_start, ts, teacher, student, ctx, ac, gen, prediction_type="v_prediction")
    replay = torch.Generator().manual_seed(5)
    for i in range(1, 3):
        want = q_sample(x0, ts[i], torch.randn(x0.shape, generator=replay), ac)
        torch.testing.assert_close(seen[i], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        distill_trajectory(x_start, ts, teacher, student, ctx, ac, gen, prediction_type="sample")


def test_latents_and_context_stay_fp32_with_bf16_unets():
    """bf16 'UNets' (the callables cast to bf16 as stage 1's do): the latents handed from step to step are fp32 and
    equal an fp32 recomputation from the same UNet outputs; the context reaching the student is fp32."""
    ac = _ac()
    g = torch.Generator().manual_seed(2)
    k, b = 5, 2
    ts = torch.tensor([[999, 990], [700, 650], [400, 420], [200, 150], [20, 10]])
    x_start = torch.randn(b, 4, 4, 4, generator=g)
    w = torch.randn(4, 4, generator=g)
    xs, ctx_dtypes = [], []

    def unet(x):
        return torch.einsum("bchw,cd->bdhw", x.to(torch.bfloat16), w.to(torch.bfloat16))

    def teacher(x, t):
        xs.append(x)
        return unet(x)

    def student(x, t, ctx):
        ctx_dtypes.append(ctx.dtype)
        return unet(x) * ctx.to(torch.bfloat16).mean()

    leaf = torch.ones(b, 3, dtype=torch.bfloat16, requires_grad=True)
    distill_trajectory(x_start, ts, teacher, student, leaf, ac, torch.Generator().manual_seed(3))
    assert [x.dtype for x in xs] == [torch.float32] * k
    assert ctx_dtypes == [torch.float32] * k
    replay = torch.Generator().manual_seed(3)
    x = x_start
    for i in range(k - 1):
        x0 = predict_x0(x, unet(x), ts[i], ac)
        x = q_sample(x0, ts[i + 1], torch.randn(x.shape, generator=replay), ac)
        torch.testing.assert_close(xs[i + 1], x, atol=0, rtol=0)
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16


def test_bf16_context_gradient_is_accumulated_in_fp32_and_rounded_once():
    """k per-step context gradients of about 8 + 2^-5 i each: summed in fp32 and rounded to bf16 once, exactly
    the correctly rounded sum (a bf16 accumulator rounds after every step and drifts from it)."""
    ac = _ac()
    ts = torch.tensor([[900], [600], [300], [100]])
    coefs = [torch.full((1, 8), 1.0 + 2.0 ** -9 * (i + 1)) for i in range(len(ts))]
    calls = iter(range(len(ts)))

    def teacher(x, t):
        return torch.zeros_like(x)

    def student(x, t, ctx):
        # output s_i = <ctx, c_i> everywhere: mse(s_i, 0) = s_i^2, so d mse_i / d ctx = 2 s_i c_i
        c = coefs[next(calls)]
        return x * 0 + (ctx * c).sum()

    leaf = torch.full((1, 8), 0.5, dtype=torch.bfloat16, requires_grad=True)
    distill_trajectory(torch.zeros(1, 4, 2, 2), ts, teacher, student, leaf, ac, torch.Generator().manual_seed(0))
    ctx64 = leaf.detach().double()
    want = sum(2 * (ctx64 * c.double()).sum() * c.double() for c in coefs)
    assert torch.equal(leaf.grad, want.to(torch.bfloat16))


def test_unsupported_prediction_type_is_one_line_error(tmp_path):
    from adaface.training.engine.config import ConfigError, parse_config
    from adaface.training.method.stage1 import build_tiny_models, load_models

    sd, a2f = build_tiny_models(tmp_path / "tiny", seed=0)
    cfg_path = sd / "scheduler" / "scheduler_config.json"
    data = json.loads(cfg_path.read_text())
    data["prediction_type"] = "sample"
    cfg_path.write_text(json.dumps(data))
    cfg = parse_config(["--no-tiny", "--sd-model", str(sd), "--arc2face", str(a2f), "--output-dir",
                        str(tmp_path / "out"), "--device", "cpu"], default_config=None)
    with pytest.raises(ConfigError, match=r"--sd-model: the scheduler's prediction_type 'sample'"):
        load_models(cfg, str(sd), str(a2f), torch.device("cpu"), torch.float32)
    shutil.rmtree(tmp_path / "tiny")


def test_stage1_loss_starts_the_trajectory_in_fp32_with_bf16_models(tmp_path, monkeypatch):
    """stage1_loss with bf16 frozen models hands distill_trajectory an fp32 x_{t_1} (cast only at the UNet calls)."""
    from adaface.training.engine.config import parse_config
    from adaface.training.engine.data import FaceIdSource
    from adaface.training.method import stage1

    sd, a2f = stage1.build_tiny_models(tmp_path / "tiny", seed=0)
    cfg = parse_config(["--no-tiny", "--sd-model", str(sd), "--arc2face", str(a2f), "--output-dir",
                        str(tmp_path / "out"), "--device", "cpu", "--denoise-steps", "2",
                        "--denoise-step-weights", "1", "--resolution", "16"], default_config=None)
    models = stage1.load_models(cfg, str(sd), str(a2f), torch.device("cpu"), torch.bfloat16)
    seen = {}
    real = stage1.distill_trajectory

    def spy(x_start, *a, **k):
        seen["x_start"] = x_start.dtype
        return real(x_start, *a, **k)

    monkeypatch.setattr(stage1, "distill_trajectory", spy)
    g = torch.Generator().manual_seed(0)
    batch = FaceIdSource(None, 1.0).sample(2, g)
    loss, terms = stage1.stage1_loss(models, batch, g, settings=stage1.DistillSettings.from_config(cfg),
                                     backward_scale=None)
    assert seen["x_start"] == torch.float32
    assert torch.isfinite(loss) and len(terms["loss_steps"]) == 2
