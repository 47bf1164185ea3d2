"""Prodigy with a linear warm-up, and rebuilding its state when model expansion replaces parameters.

Rebuild rule (after `PromptInverter.expand`), per new parameter, matched to the old one by name:
- same name and shape: the old state moves over unchanged (copy 0 and untouched layers keep optimising as
  if nothing happened);
- an expanded-copy parameter (`{q,k,v}_extra_{weight,bias}`, see `copy_source`): its existing copies keep
  their state, and each new copy gets a copy of the state (Adam moments, Prodigy's `s` and its anchor `p0`)
  of the copy it duplicates (copy c of copy `c mod E`, the weights' own source map) — so the new copies do
  not start from a cold second moment;
- anything else: no state, so Prodigy initialises it on the next step with `p0` = the current weights.
The global Prodigy scalars (d, d_max, d_numerator, k, ...) carry over, so the step size does not restart
from d0 and the warm-up is not repeated.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from prodigyopt import Prodigy

if TYPE_CHECKING:
    from .config import TrainingConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, d_coef: float, weight_decay: float,
                    safeguard_warmup: bool, bias_correction: bool, d0: float = 1e-6) -> Prodigy:
    # Prodigy prints "Using decoupled weight decay" on every construction (and again at each expansion)
    with contextlib.redirect_stdout(io.StringIO()):
        return Prodigy(list(params), lr=lr, d_coef=d_coef, d0=d0, weight_decay=weight_decay, decouple=True,
                       safeguard_warmup=safeguard_warmup, use_bias_correction=bias_correction)


def describe_d(d0: float, d: float, steps: int) -> str:
    """One line on what Prodigy's step size did in a run. d rises above d0 only once Σ d·lr·⟨g, p0 − p⟩ outgrows
    d·Σ|s|, i.e. the gradients keep pointing back along the distance travelled: not during a warm-up's small
    learning rates, and not while the gradients are mostly noise (short runs of random tiny models)."""
    if d <= d0:
        return (f"Prodigy's d stayed at d0 = {d0:g} for all {steps} steps (it rises only once the gradients agree "
                "with the distance travelled)")
    return f"Prodigy's d rose from d0 = {d0:g} to {d:.3g} in {steps} steps"


def warmup_factor(warmup_steps: int):
    """LambdaLR factor; never 0, because Prodigy skips its d update on a zero learning rate."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps))


def build_for_config(params: Iterable[torch.nn.Parameter],
                     cfg: TrainingConfig) -> tuple[Prodigy, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and warm-up scheduler of a run with options `cfg`, over `params`."""
    optimizer = build_optimizer(params, lr=cfg.lr, d0=cfg.d0, d_coef=cfg.d_coef, weight_decay=cfg.weight_decay,
                                safeguard_warmup=cfg.safeguard_warmup, bias_correction=cfg.bias_correction)
    return optimizer, build_scheduler(optimizer, cfg.warmup_steps)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """JSON-safe scheduler state (the lambdas themselves are rebuilt from the config)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: Mapping[str, Any]) -> None:
    full = scheduler.state_dict()
    full.update(state)
    scheduler.load_state_dict(full)


_EXTRA = re.compile(r"^(?P<prefix>.*)\.(?P<proj>[qkv])_extra_(?P<kind>weight|bias)$")


def copy_source(name: str) -> str | None:
    """The copy-0 parameter of an expanded copy: `...self_attn.q_extra_weight` <- `...self_attn.q_proj.weight`.

    This is the layout of `adaface.models.expanded_clip_attention`: copy 0 stays in the original Linear, copies
    1..E-1 live in `{p}_extra_weight [E-1, out, in]` / `{p}_extra_bias [E-1, out]`, and growing E → E' keeps the
    existing copies first and appends duplicates, copy c of copy `c mod E` (`expansion_sources`).
    """
    m = _EXTRA.match(name)
    return None if m is None else f"{m['prefix']}.{m['proj']}_proj.{m['kind']}"


FLAT_STATE = ("s", "p0")  # Prodigy keeps these flattened (p.flatten()[::slice_p]), whatever the parameter's shape


def _per_copy(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """One parameter's state tensor in the parameter's own shape; None where it has no per-element layout."""
    numel = torch.Size(shape).numel()
    if value.dim() == 0 and key == "p0":
        return torch.zeros(shape, dtype=value.dtype, device=value.device)  # Prodigy's p0 of an all-zero parameter
    if value.numel() != numel:
        return None  # sliced statistics (slice_p > 1) cannot be laid out per copy
    return value.reshape(shape)


def _grow_copies(key: str, old_extra: torch.Tensor | None, old_shape: torch.Size | None, copy0: torch.Tensor,
                 copy0_shape: torch.Size, new_shape: torch.Size) -> torch.Tensor | None:
    """State of a grown `[E'-1, ...]` extra parameter: the old copies' rows, then each new copy's source's row.

    `old_extra` (shape `old_shape`, `[E-1, ...]`) is None when the layer had one copy. Rows follow the source map
    of the weights (`expansion_sources`), so every new copy starts from the moments of the copy it duplicates.
    None when a state tensor cannot be laid out per copy (the caller then leaves the parameter fresh).
    """
    from adaface.models.expanded_clip_attention import expansion_sources

    flat = key in FLAT_STATE
    c0 = _per_copy(key, copy0, copy0_shape)
    if c0 is None or tuple(new_shape[1:]) != tuple(c0.shape):
        return None
    copies = [c0.unsqueeze(0)]
    if old_extra is not None:
        old = _per_copy(key, old_extra, old_shape)
        if old is None or tuple(old.shape[1:]) != tuple(c0.shape):
            return None
        copies.append(old.to(c0.dtype))
    copies = torch.cat(copies)  # [E, ...]: copy 0 first, as in the weights
    current = copies.shape[0]
    rows = list(range(1, current)) + expansion_sources(current, new_shape[0] + 1)
    out = copies[rows]
    return out.flatten() if flat else out


def snapshot_state(optimizer: torch.optim.Optimizer,
                   names: Mapping[torch.nn.Parameter, str]) -> tuple[dict[str, tuple[torch.Size, dict]], dict]:
    """Name-keyed per-parameter state (with each parameter's shape; `{}` before its first step) and the first
    group's scalars. Parameters without state are listed too, so a later expansion knows their old shapes."""
    per_param = {names[p]: (p.shape, dict(optimizer.state.get(p, {})))
                 for group in optimizer.param_groups for p in group["params"]}
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return per_param, group


def transfer_state(optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.nn.Parameter],
                   old_state: Mapping[str, tuple[torch.Size, dict]], old_group: Mapping[str, Any]) -> dict[str, str]:
    """Fill a freshly built optimizer from a snapshot; returns {name: 'kept'|'grown'|'fresh'} for logging."""
    report: dict[str, str] = {}
    for name, p in named_params.items():
        old = old_state.get(name)
        if old is not None and tuple(old[0]) == tuple(p.shape):
            if old[1]:
                optimizer.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in old[1].items()}
            report[name] = "kept" if old[1] else "fresh"
            continue
        src = copy_source(name)
        if src is None or src not in old_state or not old_state[src][1] or (old is not None and not old[1]):
            report[name] = "fresh"  # a new parameter, or copies whose state was never built
            continue
        c0_shape, c0_state = old_state[src]
        new_st: dict[str, Any] = {}
        for k, v in c0_state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                old_v = None if old is None else old[1].get(k)
                if old is not None and old_v is None:
                    new_st = {}
                    break
                grown = _grow_copies(k, old_v, None if old is None else old[0], v, c0_shape, p.shape)
                if grown is None:
                    new_st = {}
                    break
                new_st[k] = grown.to(p.device).clone()
            else:
                new_st[k] = v
        if new_st:
            optimizer.state[p] = new_st
            report[name] = "grown"
        else:
            report[name] = "fresh"
    for group in optimizer.param_groups:
        for k, v in old_group.items():
            group[k] = v
    return report
