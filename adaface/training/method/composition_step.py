"""One stage-2 composition-distillation step (paper §2.3–2.4) as a plain function of models, batch, config, RNG.

`composition_step(models, batch, cfg, pool, generator)` returns the weighted total loss (a 0-dim tensor to
back-propagate) and the unweighted terms as detached 0-dim tensors named `loss_*`; it never reads a value back to
the host, so it runs unchanged on tensors without storage (the meta device) and costs no device sync. Blocks:

1. the subjects' 16 embeddings: ArcFace → Arc2Face ID tokens (no grad) → Prompt Inverter;
2. one composition per subject from the pool and the four prompts (the class prompts natural sentences);
3. the SD text encoder: the two subject prompts with gradient, the two class prompts without (then laid out like
   the subject prompts for the prompt-embedding delta);
4. one noisy latent per subject (its face image, VAE-encoded, noised to t): the four branches share it;
5. the UNet with the feature capture recording: the subject branches with gradient, the class branches without;
6. per selected layer: normalise, pool, and the delta losses (attention outputs per position; per head, the spatial
   map of the attention on the subject's 16 slots against the class word's) and the face-preserving loss; the
   prompt-embedding delta; the weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adaface.models.subject_prompt import encode_prompt
from adaface.models.unet_feature_capture import UNetFeatureCapture

from .composition_losses import (
    batch_norm_rows,
    delta_loss,
    face_preserve_loss,
    layer_average,
    layer_hw,
    layer_norm,
    layer_weight,
    map_delta_loss,
    mask_rows,
    pool_rows,
    token_attention_maps,
)
from .compositions import (
    PLACEHOLDER,
    CompositionPool,
    align_class_embeddings,
    build_prompts,
    encode_class_prompts,
    resolve_class_words,
)
from .distill import q_sample

TERMS = ("loss_delta_attn_out", "loss_delta_attn_map", "loss_delta_prompt", "loss_face_preserve")
DELTA_TERMS = TERMS[:3]


@dataclass
class CompositionConfig:
    """Options of the stage-2 losses; defaults follow the paper where it speaks, else the authors' released training
    (adaface.training.method.stage2.Stage2Config's help text says which)."""

    delta_layers: list[Any] = field(default_factory=lambda: ["*"])  # paper: all cross-attention layers
    face_layers: list[Any] = field(default_factory=lambda: ["*"])  # paper: each cross-attention layer
    layer_weights: dict[str, float] = field(default_factory=dict)  # fnmatch pattern -> weight (default 1)
    pool_above: int = 8  # maps with a side above this are average-pooled (kernel 4, stride 2) for the delta loss
    pool_face: bool = False  # pool for the face-preserving loss too (the fused kernel streams the full maps)
    normalize_q: bool = True  # non-affine batch norm on the queries
    normalize_features: bool = True  # non-affine layer norm on the output features
    subject_single_grad: float = 0.1  # gradient fraction of the subject-single branch in the UNet delta losses
    prompt_single_grad: float = 1.0  # ... in the prompt-embedding delta
    face_q_grad: float = 0.1  # ... of its queries in the face-preserving loss
    face_feat_grad: float = 0.01  # ... of its features in the face-preserving loss
    w_delta_attn_out: float = 1e-3
    w_delta_attn_map: float = 1e-3
    w_delta_prompt: float = 1e-3  # eq. 4: the three feature kinds weigh the same
    w_face_preserve: float = 1e-3
    t_min: int = 500  # timesteps of the composition step, [t_min, t_max)
    t_max: int = 800
    default_class_word: str = "person"
    backend: str = "auto"  # adaface.ops backend of the fused losses
    face_precision: str = "auto"  # matmul precision of the soft-warp kernels (adaface.ops.soft_warp.resolve_precision)


@dataclass
class CompositionModels:
    tokenizer: Any
    text_encoder: torch.nn.Module  # frozen SD-1.5 text encoder
    unet: torch.nn.Module  # frozen SD-1.5 UNet
    capture: UNetFeatureCapture  # installed on the union of the delta and face layers
    teacher: Any  # adaface.models.Arc2Face (its encoder gives the ID tokens)
    inverter: torch.nn.Module  # the Prompt Inverter (or its DDP wrapper): the only trainable part
    vae: torch.nn.Module
    vae_scale: float
    alphas_cumprod: torch.Tensor


@dataclass
class CompositionBatch:
    arcface: torch.Tensor  # [B, 512]
    images: torch.Tensor  # [B, 3, R, R] in [-1, 1]
    masks: torch.Tensor  # [B, 1, R, R] in [0, 1]
    class_words: list[str | None]


@dataclass
class CompositionResult:
    loss: torch.Tensor  # weighted sum of the terms, to back-propagate
    terms: dict[str, torch.Tensor]  # TERMS, unweighted, detached
    compositions: list[str]


def subject_embeddings(m: CompositionModels, arcface: torch.Tensor) -> torch.Tensor:
    """[B, 16, H] text-space subject embeddings from ArcFace vectors (the inverter's gradient path)."""
    with torch.no_grad():
        ctx = m.teacher.prompt_embeds(arcface)
        p = m.teacher.id_position
        id_tokens = ctx[:, p:p + m.teacher.num_id_tokens].float()
    return m.inverter(id_tokens)


def noisy_latents(m: CompositionModels, images: torch.Tensor, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The face images' VAE latents (a sample of the posterior) noised to t; the RNG is drawn on the CPU."""
    with torch.no_grad():
        dist = m.vae.encode(images.to(m.vae.dtype)).latent_dist
        shape = tuple(dist.mean.shape)
        sample = torch.randn(shape, generator=g).to(dist.mean.device, dist.mean.dtype)
        lat = (dist.mean + dist.std * sample).float() * m.vae_scale
        noise = torch.randn(shape, generator=g).to(lat.device)
        return q_sample(lat, t, noise, m.alphas_cumprod.to(lat.device))


def composition_step(m: CompositionModels, batch: CompositionBatch, cfg: CompositionConfig, pool: CompositionPool,
                     generator: torch.Generator) -> CompositionResult:
    device = next(m.unet.parameters()).device
    b = batch.arcface.shape[0]

    # 1. the subjects' embeddings (gradient to the inverter)
    subject = subject_embeddings(m, batch.arcface.to(device))
    num_slots = subject.shape[1]

    # 2. compositions and the four prompts
    compositions = [pool.sample(generator) for _ in range(b)]
    words = resolve_class_words(batch.class_words, cfg.default_class_word)
    prompts = build_prompts(m.tokenizer, compositions, words, num_slots=num_slots)

    # 3. prompt embeddings: subject prompts with gradient, class prompts without
    both = prompts.single + prompts.composition
    subj_ctx = encode_prompt(m.tokenizer, m.text_encoder, both, torch.cat([subject, subject]).to(m.text_encoder.dtype),
                             placeholder=PLACEHOLDER)
    with torch.no_grad():
        cls_ctx = encode_class_prompts(m.text_encoder, prompts.class_ids)

    # 4. one noisy latent and timestep per subject, shared by its four branches
    t = torch.randint(cfg.t_min, cfg.t_max, (b,), generator=generator)
    x_t = noisy_latents(m, batch.images.to(device), t, generator).to(m.unet.dtype)
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t]).to(device)

    # 5. the UNet, recording the selected layers: subject branches with gradient, class branches without
    with m.capture.recording() as subj_feats:
        m.unet(x2, t2, encoder_hidden_states=subj_ctx.to(m.unet.dtype))
    with torch.no_grad(), m.capture.recording() as cls_feats:
        m.unet(x2, t2, encoder_hidden_states=cls_ctx.to(m.unet.dtype))

    # 6. losses per layer, then the prompt-embedding delta
    latent_hw = tuple(x_t.shape[-2:])
    delta_names = [n for n in m.capture.layers if n in _selected(m.capture, cfg.delta_layers)]
    face_names = [n for n in m.capture.layers if n in _selected(m.capture, cfg.face_layers)]
    out_losses, map_losses, face_losses, dw, fw = [], [], [], [], []
    subj_tokens = torch.zeros(b, subj_ctx.shape[1])
    subj_tokens[:, prompts.slot_start:prompts.slot_start + num_slots] = 1.0
    subj_tokens = torch.cat([subj_tokens, subj_tokens]).to(device)
    cls_tokens = prompts.class_token_mask(cls_ctx.shape[1])
    cls_tokens = torch.cat([cls_tokens, cls_tokens]).to(device)
    for name in m.capture.layers:
        fs, fc = subj_feats[name], cls_feats[name]
        hw = layer_hw(fs.num_positions, latent_hw)
        w = layer_weight(name, cfg.layer_weights)
        q_subj = fs.query()
        if name in delta_names and w > 0:
            feats = [pool_rows(x, hw, cfg.pool_above) for x in (*fs.output.chunk(2), *fc.output.chunk(2))]
            if cfg.normalize_features:
                feats = [layer_norm(x) for x in feats]
            out_losses.append(delta_loss(*feats, subject_single_grad=cfg.subject_single_grad, backend=cfg.backend))
            # per head, the spatial map of the attention on the subject's 16 slots / the class word's tokens
            maps = (*token_attention_maps(fs.maps(q_subj), subj_tokens).chunk(2),
                    *token_attention_maps(fc.maps(), cls_tokens).chunk(2))
            map_losses.append(map_delta_loss(*maps, hw, cfg.pool_above, subject_single_grad=cfg.subject_single_grad,
                                             backend=cfg.backend))
            dw.append(w)
        if name in face_names and w > 0:
            q_ss, q_sc = q_subj.chunk(2)
            f_ss, f_sc = fs.output.chunk(2)
            mask = mask_rows(batch.masks.to(device), hw)
            if cfg.pool_face:
                q_ss, q_sc, f_ss, f_sc = (pool_rows(x, hw, cfg.pool_above) for x in (q_ss, q_sc, f_ss, f_sc))
                mask = pool_rows(mask.unsqueeze(-1), hw, cfg.pool_above).squeeze(-1)
            q_ss, q_sc = batch_norm_rows(q_ss, q_sc) if cfg.normalize_q else (q_ss.float(), q_sc.float())
            f_ss, f_sc = (layer_norm(x) for x in (f_ss, f_sc)) if cfg.normalize_features else (f_ss.float(),
                                                                                               f_sc.float())
            face_losses.append(face_preserve_loss(q_ss, q_sc, f_ss, f_sc, mask, q_grad=cfg.face_q_grad,
                                                  feat_grad=cfg.face_feat_grad, backend=cfg.backend,
                                                  precision=cfg.face_precision))
            fw.append(w)
    weights = prompts.token_weights.to(device)
    ss, sc = subj_ctx.float().chunk(2)
    spans = [*prompts.class_spans, *prompts.class_spans]
    cs, cc = align_class_embeddings(cls_ctx.float(), spans, prompts.slot_start, num_slots).chunk(2)
    terms = {
        "loss_delta_attn_out": layer_average(out_losses, dw),
        "loss_delta_attn_map": layer_average(map_losses, dw),
        "loss_delta_prompt": delta_loss(ss, sc, cs, cc, weights, subject_single_grad=cfg.prompt_single_grad,
                                        backend=cfg.backend),
        "loss_face_preserve": layer_average(face_losses, fw),
    }
    loss = (cfg.w_delta_attn_out * terms["loss_delta_attn_out"] + cfg.w_delta_attn_map * terms["loss_delta_attn_map"]
            + cfg.w_delta_prompt * terms["loss_delta_prompt"] + cfg.w_face_preserve * terms["loss_face_preserve"])
    return CompositionResult(loss, {k: v.detach() for k, v in terms.items()}, compositions)


def _selected(capture: UNetFeatureCapture, selection: list[Any]) -> set[str]:
    from adaface.models.unet_feature_capture import select_layers

    return set(select_layers(capture.all_layers, selection))


def capture_layers(unet: torch.nn.Module, cfg: CompositionConfig) -> list[str]:
    """The union of the delta and face layer selections (ValueError naming a selection that names no layer)."""
    from adaface.models.unet_feature_capture import cross_attention_layers, select_layers

    names = cross_attention_layers(unet)
    chosen = set()
    for what, sel in (("delta_layers", cfg.delta_layers), ("face_layers", cfg.face_layers)):
        try:
            chosen.update(select_layers(names, sel))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e
    return [n for n in names if n in chosen]
