"""The stage-2 step on tiny models: shared noise, gradient routing, the fused ops and their references, masking."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adaface import ops
from adaface.training.method import composition_losses as cl
from adaface.training.method import composition_step as cstep
from adaface.training.method.compositions import CompositionPool


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    from transformers import CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.models.unet_feature_capture import UNetFeatureCapture
    from adaface.testing.tiny_models import save_tiny_tokenizer, sd15_scheduler, tiny_text_encoder, tiny_unet, tiny_vae

    tok = CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))
    unet = tiny_unet().requires_grad_(False)
    capture = UNetFeatureCapture(unet, cstep.capture_layers(unet, cstep.CompositionConfig()))
    return cstep.CompositionModels(
        tokenizer=tok, text_encoder=tiny_text_encoder().requires_grad_(False), unet=unet, capture=capture,
        teacher=Arc2Face(tiny_text_encoder(seed=1).requires_grad_(False), tok),
        inverter=PromptInverter(tiny_text_encoder(seed=2), tokenizer=tok), vae=tiny_vae().requires_grad_(False),
        vae_scale=0.18215, alphas_cumprod=sd15_scheduler().alphas_cumprod,
    )


def make_batch(b: int = 2, seed: int = 0) -> cstep.CompositionBatch:
    g = torch.Generator().manual_seed(seed)
    arcface = torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1)
    masks = torch.zeros(b, 1, 16, 16)
    masks[:, :, 4:12, 5:11] = 1.0
    return cstep.CompositionBatch(arcface, torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, masks, ["man", None][:b])


def run(models, cfg=None, seed=0):
    models.inverter.zero_grad(set_to_none=True)
    return cstep.composition_step(models, make_batch(), cfg or cstep.CompositionConfig(), CompositionPool.default(),
                            torch.Generator().manual_seed(seed))


class UNetSpy:
    """Records each UNet call's inputs (and keeps the context's gradient) through a forward pre-hook."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ctx = kwargs["encoder_hidden_states"]
        if ctx.requires_grad:
            ctx.retain_grad()
        self.calls.append({"x": args[0], "t": args[1], "ctx": ctx, "grad_enabled": torch.is_grad_enabled()})

    def remove(self):
        self.handle.remove()


def test_four_branches_share_the_initial_noise_and_the_class_branch_has_no_graph(models):
    spy = UNetSpy(models.unet)
    try:
        res = run(models)
    finally:
        spy.remove()
    assert len(spy.calls) == 2
    subj, cls = spy.calls
    for call in (subj, cls):
        a, b = call["x"].chunk(2)
        assert torch.equal(a, b)
        assert torch.equal(*call["t"].chunk(2))
    assert torch.equal(subj["x"], cls["x"]) and torch.equal(subj["t"], cls["t"])
    assert subj["grad_enabled"] and subj["ctx"].requires_grad
    assert not cls["grad_enabled"] and not cls["ctx"].requires_grad
    assert set(res.terms) == set(cstep.TERMS) and all(torch.isfinite(v) for v in res.terms.values())
    assert all(not v.requires_grad for v in res.terms.values()) and res.loss.requires_grad
    assert len(res.compositions) == 2
    # the class branches see the natural class sentences ("a photo of a man, <composition>"), as encoded plainly
    from adaface.training.method.compositions import build_prompts, encode_class_prompts

    prompts = build_prompts(models.tokenizer, res.compositions, ["man", "person"])
    assert prompts.class_single == ["a photo of a man", "a photo of a person"]
    with torch.no_grad():
        torch.testing.assert_close(cls["ctx"], encode_class_prompts(models.text_encoder, prompts.class_ids))


SLOT0, CLASS_TOKENS = 4, (5, 7)


def synthetic_maps(ignore: bool, shared: bool = False, b: int = 2, heads: int = 4, side: int = 16, seed: int = 0):
    """[B, heads, N, 77] attention probabilities of the four branches. Subject and class attend with the same
    spatial map (the subject spread over its 16 slots in a pattern of its own, the class over its word's two
    tokens); the compositions rescale it spatially the same way for both (`ignore=False`), or the subject's map
    only loses 20% of its mass everywhere, with 1% noise (`ignore=True`). `shared`: one rescaling for all heads
    (each position's slot vector then only shrinks: the per-position form's degenerate case). The rest of each
    row is on BOS."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    m = torch.nn.functional.softplus(torch.randn(b, heads, n, 1, generator=g) * 2)
    m = 0.5 * m / m.amax(2, keepdim=True)
    slot_pattern = torch.softmax(torch.randn(b, heads, 1, 16, generator=g) * 2, -1)
    word_pattern = torch.tensor([0.7, 0.3])
    rescale = 0.2 + 0.8 * torch.rand(b, 1 if shared else heads, n, 1, generator=g)
    ignored = 0.8 * (1 + 0.01 * torch.randn(b, heads, n, 1, generator=g))

    def probs(part, cols):
        a = torch.zeros(b, heads, n, 77)
        a[..., cols] = part
        a[..., 0] = 1 - a.sum(-1)
        return a

    slots, word = slice(SLOT0, SLOT0 + 16), slice(*CLASS_TOKENS)
    return (probs(m * slot_pattern, slots), probs((ignored if ignore else rescale) * m * slot_pattern, slots),
            probs(m * word_pattern, word), probs(rescale * m * word_pattern, word))


def map_delta(ss, sc, cs, cc, side: int = 16):
    """The step's map-delta loss on full attention probabilities, and its gradient's norm w.r.t. the subject's."""
    ss, sc = ss.requires_grad_(True), sc.requires_grad_(True)
    subj, cls = torch.zeros(ss.shape[0], 77), torch.zeros(ss.shape[0], 77)
    subj[:, SLOT0:SLOT0 + 16] = 1.0
    cls[:, slice(*CLASS_TOKENS)] = 1.0
    maps = [cl.token_attention_maps(x, t) for x, t in ((ss, subj), (sc, subj), (cs, cls), (cc, cls))]
    assert all(x.shape == (ss.shape[0], ss.shape[1], side * side) for x in maps)
    loss = cl.map_delta_loss(*maps, (side, side), cstep.CompositionConfig().pool_above, backend="torch")
    grads = torch.autograd.grad(loss, (ss, sc))
    return loss.item(), max(float(gr.norm()) for gr in grads)


@pytest.mark.parametrize("shared", [False, True])
def test_map_delta_compares_spatial_maps_of_the_subject_tokens(shared):
    """Paper §2.3, "the attention maps of the subject tokens": per head, the map summed over the 16 slots. An ideal
    compositional response (subject and class rescaled spatially alike, the subject's split over its slots
    unlike the class's) costs ~0 with a small gradient; a subject whose map ignores the composition costs ~1."""
    ideal, ideal_grad = map_delta(*synthetic_maps(ignore=False, shared=shared))
    assert ideal < 1e-4 and ideal_grad < 1e-2
    ignored, _ = map_delta(*synthetic_maps(ignore=True, shared=shared))
    assert ignored > 0.5
    # the 16x16 maps are pooled (kernel 4, stride 2) to 7x7 per head before the delta
    maps = cl.token_attention_maps(synthetic_maps(False)[0], torch.ones(2, 77))
    assert cl.pool_rows(maps.transpose(1, 2), (16, 16), 8).shape == (2, 49, 4)


@pytest.mark.parametrize("term, option, applies", [
    ("w_delta_attn_out", "subject_single_grad", True), ("w_delta_attn_map", "subject_single_grad", True),
    ("w_delta_prompt", "prompt_single_grad", True), ("w_delta_prompt", "subject_single_grad", False),
])
def test_subject_single_branch_gets_the_configured_gradient_fraction(models, term, option, applies):
    """With one delta term on, the context gradient of the subject-single half scales with the fraction that
    applies to that term (the UNet deltas' `subject_single_grad` leaves the prompt delta alone), the
    subject-composition half's does not."""
    only = {k: 0.0 for k in ("w_delta_attn_out", "w_delta_attn_map", "w_delta_prompt", "w_face_preserve")}
    grads = {}
    for frac in (1.0, 0.1):
        cfg = dataclasses.replace(cstep.CompositionConfig(), **{**only, term: 1.0, option: frac})
        spy = UNetSpy(models.unet)
        try:
            res = run(models, cfg)
            ctx = spy.calls[0]["ctx"]
            res.loss.backward()
        finally:
            spy.remove()
        grads[frac] = ctx.grad.chunk(2)
    (ss1, sc1), (ss01, sc01) = grads[1.0], grads[0.1]
    assert ss1.abs().sum() > 0 and sc1.abs().sum() > 0
    torch.testing.assert_close(ss01, (0.1 if applies else 1.0) * ss1, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(sc01, sc1, rtol=1e-4, atol=1e-9)


def test_face_preserving_fractions_reach_queries_and_features():
    """scale_grad: value unchanged, gradient multiplied; inside the face-preserving loss per input."""
    x = torch.randn(2, 5, 4, requires_grad=True)
    y = cl.scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * 2 * x.detach())
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(2, 6, 4, generator=g, requires_grad=True) for _ in range(2)]
    f = [torch.randn(2, 6, 3, generator=g, requires_grad=True) for _ in range(2)]
    mask = torch.rand(2, 6, generator=g)
    full = torch.autograd.grad(cl.face_preserve_loss(q[0], q[1], f[0], f[1], mask, backend="torch"), q + f)
    part = torch.autograd.grad(cl.face_preserve_loss(q[0], q[1], f[0], f[1], mask, q_grad=0.1, feat_grad=0.01,
                                                     backend="torch"), q + f)
    for got, want, frac in zip(part, full, (0.1, 1.0, 0.01, 1.0)):
        torch.testing.assert_close(got, frac * want)


def test_step_calls_the_fused_ops_and_matches_their_references(models, monkeypatch):
    calls = {"delta": [], "warp": []}
    real_delta, real_warp = ops.delta_cosine_loss, ops.soft_warp_loss

    def delta_spy(*args, **kw):
        out = real_delta(*args, **kw)
        calls["delta"].append(([a.detach() for a in args], [a.requires_grad for a in args], kw, out.detach()))
        return out

    def warp_spy(*args, **kw):
        out = real_warp(*args, **kw)
        calls["warp"].append(([None if a is None else a.detach() for a in args], kw, out.detach()))
        return out

    monkeypatch.setattr(ops, "delta_cosine_loss", delta_spy)
    monkeypatch.setattr(ops, "soft_warp_loss", warp_spy)
    res = run(models)
    layers = models.capture.layers
    assert len(layers) == 4  # the tiny UNet: down, mid, two up
    assert len(calls["delta"]) == 2 * len(layers) + 1 and len(calls["warp"]) == len(layers)
    assert all(kw["backend"] == "auto" and kw["reduction"] == "none" for _, _, kw, _ in calls["delta"])
    assert all(kw["scale"] == 1.0 and kw["backend"] == "auto" for _, kw, _ in calls["warp"])

    def ref_delta(args, weights=None):
        rows = ops.delta_cosine_loss_reference(*args, reduction="none")
        torch.testing.assert_close(rows, real_delta(*args, reduction="none", backend="torch"))
        keep = (args[0] != args[1]).any(-1) & (args[2] != args[3]).any(-1)
        w = keep.float() * (1.0 if weights is None else weights)
        return (rows * w).sum() / w.sum()

    out_calls, map_calls = calls["delta"][0:-1:2], calls["delta"][1:-1:2]
    # attention maps: one row per head, the (pooled) spatial positions of the layer as the vector, masses in [0, 1]
    for (args, *_), (out_args, *_), name in zip(map_calls, out_calls, layers):
        assert args[0].shape == (2, models.unet.get_submodule(name).heads, out_args[0].shape[1])
        assert all(((a >= 0) & (a <= 1 + 1e-5)).all() for a in args)
    for args, req, _, rows in calls["delta"]:
        assert req[0] and req[1] and not req[2] and not req[3]  # the class side is detached
        torch.testing.assert_close(rows, ops.delta_cosine_loss_reference(*args, reduction="none"),
                                   atol=1e-5, rtol=1e-4)
    want_out = sum(ref_delta(a) for a, *_ in out_calls) / len(layers)
    want_map = sum(ref_delta(a) for a, *_ in map_calls) / len(layers)
    prompt_args = calls["delta"][-1][0]
    from adaface.training.method.compositions import build_prompts

    weights = build_prompts(models.tokenizer, res.compositions, ["man", "person"]).token_weights
    want_prompt = ref_delta(prompt_args, weights)
    want_face = sum(ops.soft_warp_loss_reference(*a) for a, _, _ in calls["warp"]) / len(layers)
    torch.testing.assert_close(res.terms["loss_delta_attn_out"], want_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.terms["loss_delta_attn_map"], want_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.terms["loss_delta_prompt"], want_prompt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.terms["loss_face_preserve"], want_face, atol=1e-5, rtol=1e-4)
    # the prompt embeddings: the causal prefix (BOS, template, the 16 slots) is identical in single and composition
    ss, sc = prompt_args[0], prompt_args[1]
    prefix = 4 + 16
    assert torch.equal(ss[:, :prefix], sc[:, :prefix]) and (ss[:, prefix:] != sc[:, prefix:]).any(-1).all()
    # the face-preserving inputs: layer-normed features, batch-normed queries, the mask at the layer's size
    for (q_ss, q_sc, f_ss, f_sc, mask), _, _ in calls["warp"]:
        torch.testing.assert_close(f_sc.std(-1, unbiased=False), torch.ones_like(f_sc[..., 0]), atol=1e-3, rtol=0)
        torch.testing.assert_close(f_ss.mean(-1), torch.zeros_like(f_ss.mean(-1)), atol=1e-5, rtol=0)
        qq = torch.cat([q_ss, q_sc]).reshape(-1, q_ss.shape[-1])
        torch.testing.assert_close(qq.mean(0), torch.zeros(qq.shape[-1]), atol=1e-5, rtol=0)
        assert mask.shape == q_ss.shape[:2] and 0 < mask.sum() < mask.numel()


def test_zero_delta_rows_are_masked_not_counted():
    g = torch.Generator().manual_seed(3)
    ss, sc, cs, cc = (torch.randn(2, 6, 8, generator=g) for _ in range(4))
    sc[:, :2] = ss[:, :2]  # a shared prefix: zero subject delta
    cc[1, 5] = cs[1, 5]  # one zero class delta
    ss.requires_grad_(True)
    sc.requires_grad_(True)
    got = cl.delta_loss(ss, sc, cs, cc, backend="torch")
    rows = ops.delta_cosine_loss_reference(ss, sc, cs, cc, reduction="none")
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, :2] = False
    keep[1, 5] = False
    torch.testing.assert_close(got, rows[keep].mean())
    # the op gives a zero delta (no direction) its documented loss 1; the training loss leaves such rows out
    assert (rows[:, :2] == 1).all() and rows[1, 5] == 1 and not torch.allclose(rows.mean(), got)
    got.backward()
    assert torch.isfinite(ss.grad).all() and torch.isfinite(sc.grad).all()
    # weights multiply the mask; nothing left gives exactly 0 with a graph
    w = torch.rand(2, 6, generator=g)
    torch.testing.assert_close(cl.delta_loss(ss, sc, cs, cc, w, backend="torch"),
                               (rows * w * keep).sum() / (w * keep).sum())
    none = cl.delta_loss(ss, ss.detach().clone(), cs, cc, backend="torch")
    assert none.item() == 0.0 and none.requires_grad


def test_pooling_layer_shapes_and_selection_errors(models):
    assert cl.layer_hw(4096, (64, 64)) == (64, 64) and cl.layer_hw(64, (64, 64)) == (8, 8)
    assert cl.layer_hw(1024, (64, 64)) == (32, 32)
    x = torch.randn(2, 64 * 64, 5)
    assert cl.pool_rows(x, (64, 64), 8).shape == (2, 31 * 31, 5)
    assert cl.pool_rows(x[:, :64], (8, 8), 8).shape == (2, 64, 5)
    assert cl.layer_weight("up_blocks.1.attentions.0", {"up_blocks.1.*": 0.5}) == 0.5
    assert cl.layer_weight("mid_block.attentions.0", {"up_blocks.1.*": 0.5}) == 1.0
    bad = dataclasses.replace(cstep.CompositionConfig(), face_layers=["up_blocks.9.*"])
    with pytest.raises(ValueError, match="face_layers: layer pattern 'up_blocks.9.\\*' names no"):
        cstep.capture_layers(models.unet, bad)


def test_step_runs_on_the_meta_device(models):
    """No host sync and no real storage needed: the same step on meta tensors (the memory estimator's use)."""
    import copy

    from adaface.models.unet_feature_capture import UNetFeatureCapture

    meta = copy.copy(models)
    meta.capture.remove()
    try:
        unet = copy.deepcopy(models.unet).to("meta")
        meta.unet = unet
        meta.capture = UNetFeatureCapture(unet, models.capture.layers)
        meta.text_encoder = copy.deepcopy(models.text_encoder).to("meta")
        meta.teacher = copy.deepcopy(models.teacher).to("meta")
        meta.inverter = copy.deepcopy(models.inverter).to("meta")
        meta.vae = copy.deepcopy(models.vae).to("meta")
        meta.alphas_cumprod = models.alphas_cumprod.to("meta")
        b = make_batch()
        b = cstep.CompositionBatch(*(t.to("meta") for t in (b.arcface, b.images, b.masks)), b.class_words)
        cfg = dataclasses.replace(cstep.CompositionConfig(), backend="torch")
        res = cstep.composition_step(meta, b, cfg, CompositionPool.default(), torch.Generator().manual_seed(0))
        assert res.loss.device.type == "meta"
        res.loss.backward()
    finally:
        meta.capture.remove()
        models.capture = UNetFeatureCapture(models.unet, models.capture.layers)
