"""Stage-1 building blocks: checkpoints, optimizer state, RNG, plateau detector, expansion schedule and
optimizer rebuild, metrics log, multi-timestep distillation, DDP helpers. Fast: no diffusion model involved."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from adaface.training.engine import checkpoint as ckpt
from adaface.training.engine.ddp import DistInfo, mix_seed, rank_seed, shard, shared_seed
from adaface.training.engine.expansion import ExpansionSchedule, parse_expansions
from adaface.training.engine.metrics_log import MetricsLog, read_jsonl
from adaface.training.engine.optim import (
    build_optimizer,
    build_scheduler,
    copy_source,
    load_scheduler_state,
    scheduler_state,
    snapshot_state,
    transfer_state,
)
from adaface.training.engine.plateau import PlateauDetector
from adaface.training.method.distill import (
    combined_loss,
    distill_trajectory,
    losses_to_floats,
    predict_x0,
    q_sample,
    sample_num_steps,
    sample_timesteps,
    trajectory_timesteps,
)


def _prodigy(params, **kw):
    args = dict(lr=1.0, d_coef=1.0, weight_decay=0.01, safeguard_warmup=True, bias_correction=True, d0=1e-3)
    args.update(kw)
    return build_optimizer(params, **args)


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


# ---- checkpoints -------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_keep_last_and_latest(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, {"w": {"a": torch.full((2, 3), float(step))}}, {"note": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000004"]
    # a half-written checkpoint (no rename yet) is invisible
    (root / ".step-00000009.tmp-1").mkdir()
    (root / "step-00000010").mkdir()  # no state.json: incomplete
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step-00000004"
    tensors, state = ckpt.load_checkpoint(latest)
    # files: what a complete copy holds, with their SHA-256
    assert state == {"step": 4, "files": ["w.safetensors"], "note": 4,
                     "sha256": {"w.safetensors": ckpt.file_sha256(latest / "w.safetensors")}}
    assert torch.equal(tensors["w"]["a"], torch.full((2, 3), 4.0))
    # re-saving a step (after a resume) replaces it atomically
    ckpt.save_checkpoint(root, 4, {"w": {"a": torch.zeros(1)}}, {"note": "again"}, keep=2)
    assert ckpt.load_checkpoint(latest)[1]["note"] == "again"
    assert not any(p.suffix == ".pkl" or p.name.endswith((".pt", ".bin")) for p in latest.iterdir())


def _save(root, step, note, keep=None):
    return ckpt.save_checkpoint(root, step, {"w": {"a": torch.full((2,), float(step))}}, {"note": note}, keep=keep)


def test_checkpoint_files_and_temp_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    _save(root, 1, "first")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for step, note in ((2, "new"), (1, "re-save")):  # a new step, and a re-save of an existing one
        events.clear()
        final = _save(root, step, note)
        tmp = str(root / f".{final.name}.tmp-{os.getpid()}")
        commit = events.index(("replace", tmp, str(final)))
        synced = {e[1] for e in events[:commit] if e[0] == "fsync"}
        for name in os.listdir(final):
            # each file's data was durable (fsynced under its own temporary name) before the folder got its name
            assert {f"{tmp}/{name}", f"{tmp}/.{name}.tmp-{os.getpid()}"} & synced, name
        assert tmp in synced  # and the folder's entries
        assert str(root) in {e[1] for e in events[commit:] if e[0] == "fsync"}  # then the rename itself
        if step == 1:  # the old copy was moved aside only after the new folder was complete
            aside = [i for i, e in enumerate(events) if e[0] == "replace" and e[1] == str(final)]
            assert aside and aside[0] > max(i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == tmp)
    assert ckpt.load_checkpoint(root / "step-00000001")[1]["note"] == "re-save"


def _crash_between_renames(root, step, note, monkeypatch):
    """Re-save `step`, crashing after the old copy was moved aside but before the new one got the final name."""
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(1)
        if ".old-" in str(dst):
            real_replace(src, dst)
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(root, step, note)
    monkeypatch.setattr(os, "replace", real_replace)


_FAKE_PIDS = iter(range(999_999_000, 999_999_999))


def _as_other_process(root):
    """Rename this process's leftovers as a dead process's (recovery and pruning treat those as stale)."""
    pid = next(_FAKE_PIDS)
    for p in root.iterdir():
        if p.name.endswith(f"-{os.getpid()}"):
            os.replace(p, root / (p.name.rsplit("-", 1)[0] + f"-{pid}"))


def _crashed_resave_of_step_4(root, monkeypatch):
    """A re-save of step 4 that crashed between its two renames, in a process that is gone now."""
    _crash_between_renames(root, 4, "again", monkeypatch)
    _as_other_process(root)


@pytest.fixture
def crashed_root(tmp_path, monkeypatch):
    """Steps 3 and 4 saved as "v3" and "v4", then a crashed re-save of step 4."""
    root = tmp_path / "ckpts"
    for step in (3, 4):
        _save(root, step, f"v{step}")
    _crashed_resave_of_step_4(root, monkeypatch)
    return root


def test_crash_during_resave_recovers_old_copy_at_load(crashed_root):
    root = crashed_root
    assert not (root / "step-00000004").exists()  # the only complete copy of step 4 is .old-*
    assert any(".old-" in p.name for p in root.iterdir())
    # loading the step by its final name recovers the aside copy
    tensors, state = ckpt.load_checkpoint(root / "step-00000004")
    assert state["note"] == "v4" and state["files"] == ["w.safetensors"]
    assert torch.equal(tensors["w"]["a"], torch.full((2,), 4.0))
    assert sorted(p.name for p in root.iterdir() if ".old-" in p.name) == []


def test_crash_during_resave_then_latest_and_prune_keep_the_step(crashed_root, monkeypatch):
    root = crashed_root
    latest = ckpt.latest_checkpoint(root)  # the resume path: finds step 4, not step 3
    assert latest == root / "step-00000004" and ckpt.load_checkpoint(latest)[1]["note"] == "v4"
    # the same crash again, then a later save with pruning (what the resumed run does) must not lose step 4
    _crashed_resave_of_step_4(root, monkeypatch)
    _save(root, 5, "v5", keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000005"]
    assert ckpt.load_checkpoint(root / "step-00000004")[1]["note"] == "v4"
    assert not any(p.name.startswith(".") for p in root.iterdir())  # stale temp folders were cleaned up


def test_prune_never_deletes_the_only_copy_of_a_step(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2, 3):
        _save(root, step, f"v{step}")
    # a complete aside copy of step 3 with no final name, as a crash leaves it; an incomplete one of step 2;
    # a redundant one of step 1 (its final copy exists)
    os.replace(root / "step-00000003", root / ".step-00000003.old-999999999")
    (root / ".step-00000002.old-999999998").mkdir()
    (root / ".step-00000001.old-999999997").mkdir()
    (root / ".step-00000001.old-999999997" / ckpt.STATE_FILE).write_text("{}")
    ckpt.prune_checkpoints(root, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert ckpt.load_checkpoint(root / "step-00000003")[1]["note"] == "v3"
    assert not any(p.name.startswith(".") for p in root.iterdir())
    # recovery also replaces an incomplete folder under the final name
    os.replace(root / "step-00000003", root / ".step-00000003.old-999999999")
    (root / "step-00000003").mkdir()
    assert ckpt.recover_checkpoints(root) == [root / "step-00000003"]
    assert ckpt.latest_checkpoint(root).name == "step-00000003"


def test_optimizer_state_roundtrip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt_a = _prodigy(a.parameters())
    sched_a = build_scheduler(opt_a, 4)
    _train(a, opt_a, sched_a, 3, seed=1)

    names_a = {p: n for n, p in a.named_parameters()}
    tensors, meta = ckpt.optimizer_state_to_flat(opt_a, names_a)
    meta = json.loads(json.dumps(meta))  # must survive JSON
    sched_json = json.loads(json.dumps(scheduler_state(sched_a)))

    b.load_state_dict(a.state_dict())
    opt_b = _prodigy(b.parameters())
    sched_b = build_scheduler(opt_b, 4)
    ckpt.optimizer_state_from_flat(opt_b, {p: n for n, p in b.named_parameters()}, tensors, meta)
    load_scheduler_state(sched_b, sched_json)
    _train(a, opt_a, sched_a, 3, seed=2)
    _train(b, opt_b, sched_b, 3, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert opt_a.param_groups[0]["d"] == opt_b.param_groups[0]["d"]


def test_rng_state_roundtrip():
    tensors, meta = ckpt.capture_rng_state()
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    ckpt.restore_rng_state(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# ---- plateau detector & expansion schedule -------------------------------------------------------------------


def test_plateau_detector_fires_on_flat_loss_only():
    det = PlateauDetector(window=5, tolerance=0.01, patience=3)
    assert not any(det.update(1.0 / (1 + i)) for i in range(50))  # steadily improving
    det.reset()
    fired = [det.update(1.0) for _ in range(12)]
    # window full at update 5 (best set), then patience 3 -> fires at update 8
    assert fired.index(True) == 7
    state = json.loads(json.dumps(det.state_dict()))
    other = PlateauDetector(window=5, tolerance=0.01, patience=3)
    other.load_state_dict(state)
    assert other.update(1.0) == det.update(1.0)


def test_expansion_schedule_default_reaches_paper_multipliers():
    sched = ExpansionSchedule.parse("4:all,2:0-2")
    m = [1] * 12
    m = sched.next_multipliers(m)
    sched.advance()
    assert m == [4] * 12
    m = sched.next_multipliers(m)
    sched.advance()
    assert m == [8, 8, 8] + [4] * 9
    assert sched.exhausted()
    assert parse_expansions("") == []
    assert parse_expansions("2:0+3") == [(2, (0, 3))]
    for bad in ("4", "1:all", "x:all", "2:3-1"):
        with pytest.raises(ValueError):
            parse_expansions(bad)
    with pytest.raises(ValueError, match="layer"):
        ExpansionSchedule.parse("2:0-5").check_layers(4)


def test_copy_source_names_copy_zero():
    assert copy_source("text_encoder.encoder.layers.3.self_attn.q_extra_weight") == \
        "text_encoder.encoder.layers.3.self_attn.q_proj.weight"
    assert copy_source("text_encoder.encoder.layers.3.self_attn.v_extra_bias") == \
        "text_encoder.encoder.layers.3.self_attn.v_proj.bias"
    assert copy_source("text_encoder.encoder.layers.3.self_attn.q_proj.weight") is None


@pytest.fixture(scope="module")
def tiny_inverter_factory(tmp_path_factory):
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.tiny_models import TinyConfig, save_tiny_tokenizer, tiny_text_encoder

    cfg = TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=64)
    tok = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))

    def make():
        return PromptInverter(tiny_text_encoder(cfg, seed=0), tokenizer=str(tok))

    return make


def _inverter_step(inv, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, inv.num_id_tokens, inv.hidden_size, generator=g)
    inv(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_optimizer_rebuild_on_expansion(tiny_inverter_factory):
    inv = tiny_inverter_factory()
    named = {n: p for n, p in inv.named_parameters() if p.requires_grad}
    opt = _prodigy(named.values())
    for s in range(3):
        _inverter_step(inv, opt, s)
    names = {p: n for n, p in named.items()}
    q0 = "text_encoder.encoder.layers.0.self_attn.q_proj.weight"
    before = {k: v.clone() for k, v in opt.state[named[q0]].items() if isinstance(v, torch.Tensor)}
    d_before = opt.param_groups[0]["d"]

    def expand_and_rebuild(opt, names, mult):
        old_state, old_group = snapshot_state(opt, names)
        inv.expand(mult, noise_ratio=0.1, generator=torch.Generator().manual_seed(0))
        named = {n: p for n, p in inv.named_parameters() if p.requires_grad}
        new = _prodigy(named.values())
        return new, named, transfer_state(new, named, old_state, old_group)

    opt, named, report = expand_and_rebuild(opt, names, [4, 2])
    extra = "text_encoder.encoder.layers.0.self_attn.q_extra_weight"
    assert report[q0] == "kept" and report[extra] == "grown"
    assert "fresh" not in report.values()
    assert opt.param_groups[0]["d"] == d_before  # Prodigy's step size is not reset
    st = opt.state[named[extra]]
    assert st["exp_avg"].shape == (3, *named[q0].shape)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[named[q0]][key], before[key])
        for e in range(3):
            assert torch.equal(st[key][e], before[key])
    assert st["s"].shape == (3 * named[q0].numel(),)  # Prodigy's flattened layout is preserved
    _inverter_step(inv, opt, 10)
    grown_state = opt.state[named[extra]]["exp_avg"].clone()

    # second expansion: existing copies keep their own (now distinct) state, new ones copy copy 0's
    names = {p: n for n, p in named.items()}
    opt, named, report = expand_and_rebuild(opt, names, [8, 2])
    st = opt.state[named[extra]]
    assert st["exp_avg"].shape[0] == 7
    assert torch.equal(st["exp_avg"][:3], grown_state)
    assert torch.equal(st["exp_avg"][3], opt.state[named[q0]]["exp_avg"])
    assert report["text_encoder.encoder.layers.1.self_attn.q_extra_weight"] == "kept"  # layer 1 unchanged
    _inverter_step(inv, opt, 11)
    assert all(torch.isfinite(p).all() for p in inv.parameters())


def test_optimizer_rebuild_then_checkpoint_matches(tiny_inverter_factory):
    """An expanded inverter's optimizer state survives the flat checkpoint format (names, not positions)."""
    inv = tiny_inverter_factory()
    inv.expand([2, 1], noise_ratio=0.1, generator=torch.Generator().manual_seed(1))
    named = {n: p for n, p in inv.named_parameters() if p.requires_grad}
    opt = _prodigy(named.values())
    _inverter_step(inv, opt, 0)
    tensors, meta = ckpt.optimizer_state_to_flat(opt, {p: n for n, p in named.items()})
    inv2 = tiny_inverter_factory()
    inv2.expand([2, 1], noise_ratio=0.0)
    inv2.load_state_dict(inv.state_dict())
    named2 = {n: p for n, p in inv2.named_parameters() if p.requires_grad}
    opt2 = _prodigy(named2.values())
    ckpt.optimizer_state_from_flat(opt2, {p: n for n, p in named2.items()}, tensors, json.loads(json.dumps(meta)))
    _inverter_step(inv, opt, 1)
    _inverter_step(inv2, opt2, 1)
    for (n, a), b in zip(inv.state_dict().items(), inv2.state_dict().values()):
        assert torch.equal(a, b), n


# ---- metrics log -------------------------------------------------------------------------------------------


def test_metrics_log_resume_truncates_and_skips_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for s in range(1, 6):
        log.write("step", step=s, loss=float(s))
        if s == 3:
            log.write("checkpoint", step=3)
            log.write("expansion", step=3)
    log.close()
    with open(path, "a") as fh:
        fh.write('{"event": "step", "st')  # killed mid-write
    assert len(read_jsonl(path)) == 7
    log = MetricsLog(path, resume_step=3)
    log.write("expansion", step=3)
    log.close()
    events = [(r["event"], r["step"]) for r in read_jsonl(path)]
    assert events == [("step", 1), ("step", 2), ("step", 3), ("checkpoint", 3), ("expansion", 3)]
    assert MetricsLog(tmp_path / "n.jsonl", enabled=False)._fh is None
    assert not (tmp_path / "n.jsonl").exists()


# ---- multi-timestep distillation ---------------------------------------------------------------------------


def _alphas():
    from adaface.testing.tiny_models import sd15_scheduler

    return sd15_scheduler().alphas_cumprod


def test_q_sample_and_predict_x0_are_inverse():
    ac = _alphas()
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    xt = q_sample(x0, t, eps, ac)
    torch.testing.assert_close(predict_x0(xt, eps, t, ac), x0, atol=1e-4, rtol=1e-4)


def test_timesteps_decrease_and_step_counts_follow_weights():
    g = torch.Generator().manual_seed(0)
    ts = sample_timesteps(5, 7, 1, 1000, g)
    assert ts.shape == (5, 7)
    assert bool((ts[:-1] > ts[1:]).all()) and int(ts.min()) >= 1 and int(ts.max()) < 1000
    counts = [sample_num_steps([1, 3, 5], [1.0, 0.0, 0.0], g) for _ in range(20)]
    assert set(counts) == {1}


def test_distill_trajectory_gradient_equals_summed_loss():
    """Per-step backward into a detached context gives the gradient of the summed loss of eq. 2."""
    ac = _alphas()
    torch.manual_seed(0)
    w_ctx = torch.nn.Parameter(torch.randn(2, 3))
    conv_t = torch.nn.Conv2d(4, 4, 1)
    conv_s = torch.nn.Conv2d(4, 4, 1)

    def teacher(x, t):
        return conv_t(x) * 0.5

    def student(x, t, ctx):
        return conv_s(x) * ctx.mean() + ctx.sum() * 0.01

    x = torch.randn(2, 4, 8, 8)
    ts = torch.tensor([[900, 800], [500, 400], [100, 50]])
    for reduction, weight in (("sum", 1.0), ("sqrt_k", 3 ** -0.5)):
        w_ctx.grad = None
        res = distill_trajectory(x, ts, teacher, student, w_ctx * 2, ac, torch.Generator().manual_seed(3),
                                 reduction=reduction, backward_scale=0.5)
        got = w_ctx.grad.clone()
        # reference: the same trajectory, one graph, summed loss
        g = torch.Generator().manual_seed(3)
        xs, total = x, 0.0
        for i in range(3):
            with torch.no_grad():
                et = teacher(xs, ts[i])
            total = total + weight * torch.nn.functional.mse_loss(student(xs, ts[i], w_ctx * 2), et)
            if i < 2:
                x0 = predict_x0(xs, et, ts[i], ac)
                xs = q_sample(x0, ts[i + 1], torch.randn(xs.shape, generator=g), ac)
        w_ctx.grad = None
        (0.5 * total).backward()
        torch.testing.assert_close(got, w_ctx.grad)
        assert res.loss == pytest.approx(total.item(), rel=1e-5)
        assert len(res.step_losses) == 3
        # the step losses stay tensors (no host sync per step); one conversion gives float() of each, exactly
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in res.step_mse)
        floats = losses_to_floats(res.step_mse)
        assert floats == [float(v) for v in res.step_mse] == res.step_losses
        expected = 0.0
        for v in res.step_mse:  # the combined loss as it was accumulated before: step by step, in doubles
            expected += weight * float(v)
        assert res.loss == combined_loss(floats, weight) == expected
    assert conv_t.weight.grad is None  # the teacher never gets a gradient


def test_distill_trajectory_does_not_sync_per_step(monkeypatch):
    """No float()/.item() on the step losses inside the trajectory loop."""
    ac = _alphas()
    net = torch.nn.Conv2d(4, 4, 1)
    ctx = torch.zeros(1, requires_grad=True)

    def no_sync(self, *a, **k):
        raise AssertionError("host sync inside distill_trajectory")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__float__", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    res = distill_trajectory(torch.randn(1, 4, 4, 4), torch.tensor([[700], [300], [100]]), lambda x, t: net(x),
                             lambda x, t, c: net(x) + c, ctx, ac, torch.Generator(), backward_scale=1.0)
    monkeypatch.undo()
    assert len(res.step_mse) == 3 and res.step_losses == [0.0, 0.0, 0.0]


def test_trajectory_timesteps_random_ids_start_at_t_max_minus_one():
    is_real = torch.tensor([True, False, True, False, False])
    ts = trajectory_timesteps(4, is_real, 10, 500, torch.Generator().manual_seed(1))
    drawn = sample_timesteps(4, 5, 10, 500, torch.Generator().manual_seed(1))
    assert ts[0, ~is_real].tolist() == [499, 499, 499]
    assert torch.equal(ts[0, is_real], drawn[0, is_real])  # real images keep their drawn t_1
    assert torch.equal(ts[1:], drawn[1:])  # later steps as drawn
    assert bool((ts[:-1] > ts[1:]).all())  # still strictly decreasing
    assert torch.equal(trajectory_timesteps(2, torch.ones(3, dtype=torch.bool), 1, 1000,
                                            torch.Generator().manual_seed(2)),
                       sample_timesteps(2, 3, 1, 1000, torch.Generator().manual_seed(2)))


def test_distill_identical_streams_have_zero_loss():
    ac = _alphas()
    net = torch.nn.Conv2d(4, 4, 1)
    ctx = torch.zeros(1, requires_grad=True)
    res = distill_trajectory(torch.randn(1, 4, 4, 4), torch.tensor([[700], [300]]), lambda x, t: net(x),
                             lambda x, t, c: net(x) + c, ctx, ac, torch.Generator(), backward_scale=None)
    assert res.step_losses == [0.0, 0.0]


# ---- DDP helpers -------------------------------------------------------------------------------------------


def test_seeds_and_shards():
    assert rank_seed(0, 0, 5) != rank_seed(0, 1, 5)
    assert rank_seed(0, 0, 5) != rank_seed(0, 0, 6) != rank_seed(0, 0, 5, micro=1)
    assert rank_seed(3, 1, 2) == rank_seed(3, 1, 2)
    assert shared_seed(0, "expand", 0) == mix_seed(0, "shared", "expand", 0)
    idx = list(range(11))
    shards = [shard(idx, DistInfo(r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == idx
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_atomic_write_leaves_no_temp(tmp_path):
    ckpt.atomic_write_text(tmp_path / "a.json", "{}")
    ckpt.atomic_save_tensors({"x": torch.ones(2)}, tmp_path / "b.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.safetensors"]


def test_checkpoint_sha256_mismatch_and_set_aside(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2):
        _save(root, step, f"v{step}")
    f = root / "step-00000002" / "w.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x80  # the last byte of the tensor data: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 does not match"):
        ckpt.load_checkpoint(root / "step-00000002")
    path, _, state, damaged = ckpt.load_latest_intact(root)
    assert path.name == "step-00000001" and [p.name for p, _ in damaged] == ["step-00000002"]
    aside = ckpt.set_aside(root / "step-00000002")
    assert aside.name == "step-00000002.damaged"
    _save(root, 2, "again")
    assert ckpt.set_aside(root / "step-00000002").name == "step-00000002.damaged-2"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000001"]


def test_failed_checkpoint_write_leaves_the_earlier_ones_and_no_partial_files(tmp_path, monkeypatch):
    import errno

    root = tmp_path / "ckpts"
    _save(root, 1, "v1")

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 100)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError) as exc:
        _save(root, 2, "v2", keep=1)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename.endswith("w.safetensors")
    assert [p.name for p in root.iterdir()] == ["step-00000001"]
    assert ckpt.load_checkpoint(root / "step-00000001")[1]["note"] == "v1"


def test_stale_tiny_model_builds_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from adaface.training.method.stage1 import remove_stale_builds

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".build-{dead_pid}" / "sd15").mkdir(parents=True)
    (tmp_path / f".build-{os.getppid()}").mkdir()  # a live process's build in progress
    (tmp_path / "sd15").mkdir()
    assert remove_stale_builds(tmp_path) == [tmp_path / f".build-{dead_pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".build-{os.getppid()}", "sd15"]
