"""Prodigy's step size d through our optimizer set-up (build_optimizer, the warm-up scheduler, the state transfer
of an expansion), with the tiny preset's optimizer settings.

Prodigy raises d only when Σ_t d_t·lr_t·⟨g_t, p0 − p_t⟩ outgrows d·Σ|s|: the gradients must keep pointing back
along the distance travelled. On a consistent problem that happens within the tiny preset's 120 steps; when
the gradients are dominated by noise (the tiny preset's random models and data) it does not, and d stays at d0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaface.training.engine import optim
from adaface.training.engine.config import Stage1Config, load_config_file

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.json"


def _tiny_config() -> Stage1Config:
    return Stage1Config(**load_config_file(TINY, Stage1Config))


def _run(noise: float, rebuild_at: int | None = None) -> tuple[list[float], float]:
    """A least-squares fit of a Linear layer for the preset's steps; `noise` adds Gaussian noise of that size to
    the gradients; `rebuild_at` rebuilds the optimizer there as an expansion does (snapshot → new → transfer)."""
    cfg = _tiny_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    y = x @ torch.randn(32, 8, generator=g)
    lin = torch.nn.Linear(32, 8)
    named = dict(lin.named_parameters())
    opt, sched = optim.build_for_config(list(named.values()), cfg)
    ds = []
    for step in range(cfg.steps):
        if step == rebuild_at:
            names = {p: n for n, p in named.items()}
            old_state, old_group = optim.snapshot_state(opt, names)
            old_sched = optim.scheduler_state(sched)
            opt, sched = optim.build_for_config(list(named.values()), cfg)
            optim.transfer_state(opt, named, old_state, old_group)
            optim.load_scheduler_state(sched, old_sched)
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        for p in named.values():
            p.grad += noise * torch.randn(p.grad.shape, generator=g)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ds.append(float(opt.param_groups[0]["d"]))
    return ds, cfg.d0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prodigy_d_grows_on_a_consistent_problem_and_survives_a_rebuild():
    ds, d0 = _run(noise=0.0, rebuild_at=60)
    assert ds[59] > d0, "d did not rise in the first 60 steps of a noiseless least-squares fit"
    assert ds[60] >= ds[59], "rebuilding the optimizer (an expansion) reset d"
    assert ds[-1] > 100 * d0, f"d only reached {ds[-1]:.3g} from d0 = {d0:g}"
    assert all(b >= a for a, b in zip(ds, ds[1:])), "Prodigy's d never decreases"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prodigy_d_stays_at_d0_when_noise_dominates_the_gradients():
    ds, d0 = _run(noise=10.0)
    assert ds == [d0] * len(ds)


def test_describe_d_says_what_happened():
    assert optim.describe_d(1e-5, 1e-5, 120) == ("Prodigy's d stayed at d0 = 1e-05 for all 120 steps (it rises "
                                                 "only once the gradients agree with the distance travelled)")
    assert optim.describe_d(1e-5, 3e-3, 120) == "Prodigy's d rose from d0 = 1e-05 to 0.003 in 120 steps"
