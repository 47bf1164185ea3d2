"""Synthetic checkpoints in the layouts of the authors' released AdaFace files, for the converter's tests.

The released files are `torch.save` pickles of whole modules whose classes live in the authors' code
(`ldm.modules.subj_basis_generator`, `ldm.modules.arc2face_models`, `ldm.util`, later `adaface.*`),
transformers 4.x (`CLIPTextTransformer`, `CLIPTextConfig`, the slow `CLIPTokenizer`), einops and tokenizers.
To write such a file, this module registers small look-alike classes under exactly those module paths, so
pickle records the same global names. It must therefore run in a process of its own
(`python -m adaface.testing.released_checkpoints ...`): the registration replaces `transformers`, `einops`
and `tokenizers` in `sys.modules` for the rest of that process. The converter is then run elsewhere, where
none of these modules exist.

Each call writes `checkpoint.pt` plus `reference.safetensors` / `reference.json`: the Arc2Face-based
generator's CLIP weights under the authors' names, its layer weights and the authors' template ids, so a
test can compute the authors' forward independently of the converter.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

GENERATIONS = ("2024-05", "1-key", "2024-10", "2025")
AUTHORS = {"2024-05": "ldm", "1-key": "ldm", "2024-10": "adaface", "2025": "adaface"}


def _module(name: str) -> types.ModuleType:
    """A fake module registered in sys.modules (with its parents, so `__import__` finds it)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules or not getattr(sys.modules[sub], "_released_look_alike", False):
            if sub in sys.modules and sub == "adaface":
                continue  # our own package stays; only the authors' submodule names are added under it
            mod = types.ModuleType(sub)
            mod._released_look_alike = True
            mod.__path__ = []
            sys.modules[sub] = mod
    return sys.modules[name]


def _register(module: str, cls: type) -> type:
    cls.__module__ = module
    cls.__qualname__ = cls.__name__
    setattr(_module(module), cls.__name__, cls)
    return cls


def install_look_alikes(authors: str) -> dict[str, type]:
    """Register the look-alike classes; `authors` is "ldm" (2024-05) or "adaface" (2024-10 and later)."""
    for real in ("transformers", "einops", "tokenizers"):
        if real in sys.modules and not getattr(sys.modules[real], "_released_look_alike", False):
            raise RuntimeError(f"{real} is already imported in this process; run the writer in its own process")
    sbg = "ldm.modules.subj_basis_generator" if authors == "ldm" else "adaface.subj_basis_generator"
    a2f = "ldm.modules.arc2face_models" if authors == "ldm" else "adaface.arc2face_models"
    util = "ldm.util" if authors == "ldm" else "adaface.util"
    clip = "transformers.models.clip.modeling_clip"

    class CLIPTextConfig:
        def __init__(self, **kw: object) -> None:
            self.__dict__.update(kw)

    class QuickGELUActivation(nn.Module):
        pass

    class Rearrange(nn.Module):
        def __init__(self, pattern: str, **axes: int) -> None:
            super().__init__()
            self.pattern, self.axes_lengths = pattern, axes

    class AddedToken:
        def __init__(self, content: str) -> None:
            self.__dict__.update(content=content, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=True)

    class CLIPTokenizer:
        def __init__(self, vocab: dict[str, int], merges: list[str]) -> None:
            import regex

            self.encoder = dict(vocab)
            self.decoder = {v: k for k, v in vocab.items()}
            self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
            self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
            self.cache = {"<|startoftext|>": "<|startoftext|>"}
            self.errors = "replace"
            self._bos_token, self._eos_token = AddedToken("<|startoftext|>"), AddedToken("<|endoftext|>")
            self._pad_token = self._eos_token
            self.name_or_path = "openai/clip-vit-large-patch14"
            self.byte_decoder_sample = b"\x00\xff"  # bytes pickle through _codecs.encode at protocol 2

    class GradientScaler(nn.Module):
        def __init__(self, alpha: float) -> None:
            super().__init__()
            self._alpha = torch.tensor(alpha)

    class CLIPTextEmbeddings(nn.Module):
        def __init__(self, cfg: CLIPTextConfig) -> None:
            super().__init__()
            self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0),
                                 persistent=False)

    class CLIPAttention(nn.Module):
        def __init__(self, cfg: CLIPTextConfig) -> None:
            super().__init__()
            h = cfg.hidden_size
            self.config, self.embed_dim, self.num_heads = cfg, h, cfg.num_attention_heads
            self.head_dim = h // cfg.num_attention_heads
            self.scale, self.dropout = self.head_dim**-0.5, 0.0
            self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    class CLIPAttentionMKV(nn.Module):
        def __init__(self, cfg: CLIPTextConfig, multiplier: int, pickled_multiplier: int) -> None:
            super().__init__()
            h = cfg.hidden_size
            self.config, self.embed_dim, self.num_heads = cfg, h, cfg.num_attention_heads
            self.head_dim = h // cfg.num_attention_heads
            self.scale, self.dropout = self.head_dim**-0.5, 0.0
            self.multiplier = pickled_multiplier  # what the authors' attribute said, not always the truth
            self.k_proj = nn.Linear(h, h * multiplier)
            self.v_proj = nn.Linear(h, h * multiplier)
            self.q_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    class CLIPMLP(nn.Module):
        def __init__(self, cfg: CLIPTextConfig) -> None:
            super().__init__()
            self.config, self.activation_fn = cfg, QuickGELUActivation()
            self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
            self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    class CLIPEncoderLayer(nn.Module):
        def __init__(self, cfg: CLIPTextConfig, attn: nn.Module) -> None:
            super().__init__()
            self.embed_dim, self.self_attn = cfg.hidden_size, attn
            self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.mlp = CLIPMLP(cfg)
            self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    class CLIPEncoder(nn.Module):
        def __init__(self, cfg: CLIPTextConfig, layers: list[nn.Module]) -> None:
            super().__init__()
            self.config, self.layers, self.gradient_checkpointing = cfg, nn.ModuleList(layers), False

    class CLIPTextTransformer(nn.Module):
        def __init__(self, cfg: CLIPTextConfig, layers: list[nn.Module]) -> None:
            super().__init__()
            self.config, self.embeddings = cfg, CLIPTextEmbeddings(cfg)
            self.encoder = CLIPEncoder(cfg, layers)
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.eos_token_id = cfg.eos_token_id

    class CLIPTextModelWrapper(nn.Module):
        def __init__(self, cfg: CLIPTextConfig, layers: list[nn.Module]) -> None:
            super().__init__()
            self.config, self.text_model = cfg, CLIPTextTransformer(cfg, layers)
            self.name_or_path = "openai/clip-vit-large-patch14"

    class SubjBasisGenerator(nn.Module):
        pass

    classes = {
        "CLIPTextConfig": _register("transformers.models.clip.configuration_clip", CLIPTextConfig),
        "CLIPTokenizer": _register("transformers.models.clip.tokenization_clip", CLIPTokenizer),
        "AddedToken": _register("tokenizers", AddedToken),
        "QuickGELUActivation": _register("transformers.activations", QuickGELUActivation),
        "Rearrange": _register("einops.layers.torch", Rearrange),
        "GradientScaler": _register(util, GradientScaler),
        "CLIPAttentionMKV": _register(a2f, CLIPAttentionMKV),
        "CLIPTextModelWrapper": _register(a2f, CLIPTextModelWrapper),
        "SubjBasisGenerator": _register(sbg, SubjBasisGenerator),
    }
    for cls in (CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPEncoder, CLIPTextTransformer):
        classes[cls.__name__] = _register(clip, cls)
    return classes


def _text_model(c: dict[str, type], cfg: object, multipliers: Sequence[int], pickled: Sequence[int],
                dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for m, pm in zip(multipliers, pickled):
        attn = c["CLIPAttentionMKV"](cfg, m, pm) if m > 1 else c["CLIPAttention"](cfg)
        layers.append(c["CLIPEncoderLayer"](cfg, attn))
    model = c["CLIPTextModelWrapper"](cfg, layers)
    with torch.no_grad():  # visible LayerNorm affines and biases, so a dropped or swapped one changes outputs
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" not in name:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model.to(dtype)


def _face_generator(c: dict[str, type], cfg: object, generation: str, multipliers: Sequence[int],
                    layer_weights: torch.Tensor | None, dtype: torch.dtype, vocab: dict[str, int],
                    merges: list[str], num_id: int, seed: int, obj_vectors: int) -> nn.Module:
    h = cfg.hidden_size
    g = c["SubjBasisGenerator"]()
    g.placeholder_is_bg, g.output_dim = False, h
    # The authors' multiplier attributes: a scalar -1 in 2024-05, a list in later files; neither is reliable.
    pickled = [4] * len(multipliers)
    g.prompt2token_proj = _text_model(c, cfg, multipliers, pickled, dtype, seed)
    g.hidden_state_layer_weights = None if layer_weights is None else nn.Parameter(layer_weights.clone())
    g.hidden_state_layer_weights_grad_scaler = c["GradientScaler"](5.0)
    # The non-face input path: unused for faces; 77 vectors (about 90 MB at width 768) in the real files.
    g.obj_proj_in = nn.Sequential(nn.Linear(384, obj_vectors * h, bias=False),
                                  c["Rearrange"]("b (e d) -> b e d", e=obj_vectors, d=h),
                                  nn.LayerNorm(h), nn.Dropout(0.1))
    if generation in ("2024-05", "1-key"):
        g.prompt2token_proj_attention_multiplier = -1
        g.pos_embs = nn.Parameter(torch.randn(1, 77, h))
        g.pos_embs_ln = nn.LayerNorm(h)
        g.num_id_vecs = 77
    else:
        g.prompt2token_proj_attention_multipliers = pickled
        g.N_ID, g.N_SFX, g.dtype = num_id, 0, dtype
        g.tokenizer = c["CLIPTokenizer"](vocab, merges)
        g.pad_embeddings = torch.randn(77, h)
        g.layerwise_proj = nn.Identity()
        if generation == "2025":
            g.N_SFX = 4
            g.static_img_suffix_embs = nn.Parameter(torch.randn(1, 4, h))
    return g


def _background_generator(c: dict[str, type], h: int) -> nn.Module:
    g = c["SubjBasisGenerator"]()
    g.placeholder_is_bg, g.prompt2token_proj = True, None
    g.bg_proj_in = nn.Sequential(nn.Linear(1024, h, bias=False), nn.LayerNorm(h))
    g.pos_embs, g.latent_queries = nn.Parameter(torch.zeros(1, 257, h)), nn.Parameter(torch.randn(1, 4, h))
    g.prompt_translator = nn.Sequential(nn.Linear(h, h, bias=False), nn.LayerNorm(h))
    return g


def authors_template_ids(vocab: dict[str, int], length: int) -> list[int]:
    """The authors' `photo of a ` + 18 `, ` padded with <|endoftext|> to `length` (positions 4..19 are the slots)."""
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = [bos, vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"]] + [vocab[",</w>"]] * 18 + [eos]
    return ids + [eos] * (length - len(ids))


def write(
    out: Path,
    generation: str,
    *,
    width: int,
    layers: int,
    heads: int,
    intermediate: int,
    multipliers: Sequence[int],
    layer_weights: Sequence[float] | None = (0.9163, 0.9483, 2.0762),
    per_channel: bool = False,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    obj_vectors: int = 2,
    seed: int = 0,
) -> Path:
    """Write `out/checkpoint.pt` in the layout of `generation` (see GENERATIONS) and the reference files."""
    from .tiny_models import tiny_bpe

    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    if len(multipliers) != layers:
        raise ValueError(f"multipliers must have {layers} entries, got {len(multipliers)}")
    c = install_look_alikes(AUTHORS[generation])
    vocab, merges = tiny_bpe()
    if vocab_size is not None:  # full-size files: pad the tiny vocabulary with unused rows
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size must be at least {len(vocab)}")
    vocab_rows = vocab_size or len(vocab)
    cfg = c["CLIPTextConfig"](
        vocab_size=vocab_rows, hidden_size=width, intermediate_size=intermediate, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], torch_dtype=dtype, transformers_version="4.38.2",
        model_type="clip_text_model", architectures=["CLIPTextModel"],
    )
    lw = None
    if layer_weights is not None:
        lw = torch.tensor(layer_weights, dtype=torch.float32).view(-1, 1)
        if per_channel:
            lw = lw.repeat(1, width) + 0.01 * torch.randn(len(layer_weights), width)
    face = _face_generator(c, cfg, generation, multipliers, lw, dtype, vocab, merges, 16, seed, obj_vectors)
    if generation in ("2024-10", "2025"):
        consistent_id = _face_generator(c, cfg, generation, [1] * layers, lw, dtype, vocab, merges, 4, seed + 1,
                                        obj_vectors)
        z: nn.Module = nn.ModuleList([consistent_id, face])
    else:
        z = face
    if generation == "1-key":
        generators = nn.ModuleDict({"z": z})
    else:
        generators = nn.ModuleDict({"z": z, "y": _background_generator(c, width)})
    if generation == "2024-05":
        ckpt = {
            "string_to_token": {"z": torch.tensor(vocab["z</w>"]), "y": torch.tensor(vocab["a</w>"])},
            "string_to_static_embedder": nn.ParameterDict(),
            "string_to_subj_basis_generator_dict": generators,
            "token2num_vectors": {"z": 16, "y": 4},
            "emb_global_scale_scores": nn.Parameter(torch.zeros(2)),
            "use_conv_attn_kernel_size": -1,
            "placeholder_strings": ["z", "y"],
            "subject_strings": ["z"],
            "background_strings": ["y"],
            "ca_q_bns": nn.ModuleDict({"8": nn.BatchNorm1d(width)}),
            "ca_outfeat_lns": nn.ModuleDict({"8": nn.LayerNorm(width)}),
            "do_zero_shot": True,
        }
    elif generation == "2024-10":
        ckpt = {
            "string_to_subj_basis_generator_dict": generators, "token2num_vectors": {"z": 16, "y": 4},
            "placeholder_strings": ["z", "y"], "subject_strings": ["z"], "background_strings": ["y"],
            "ca_q_bns": nn.ModuleDict(), "ca_outfeat_lns": nn.ModuleDict(),
        }
    elif generation == "2025":
        ckpt = {
            "string_to_subj_basis_generator_dict": generators, "placeholder_strings": ["z", "y"],
            "subject_strings": ["z"],
            "unet_lora_modules": {"base_model_model_up_blocks_3_attentions_1_to_q_lora_A": torch.randn(4, width)},
        }
    else:
        ckpt = {"string_to_subj_basis_generator_dict": generators}

    out.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out / "checkpoint.pt")
    _write_reference(out, face, cfg, vocab, multipliers, lw)
    return out / "checkpoint.pt"


def _write_reference(out: Path, face: nn.Module, cfg: object, vocab: dict[str, int], multipliers: Sequence[int],
                     lw: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in face.prompt2token_proj.state_dict().items()}
    if lw is not None:
        tensors["hidden_state_layer_weights"] = lw.float()
    save_file(tensors, str(out / "reference.safetensors"))
    meta = {"num_heads": cfg.num_attention_heads, "layer_norm_eps": cfg.layer_norm_eps,
            "multipliers": list(multipliers), "input_ids": authors_template_ids(vocab, cfg.max_position_embeddings),
            "num_layers": cfg.num_hidden_layers}
    (out / "reference.json").write_text(json.dumps(meta))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output folder (one subfolder per generation when several are given)")
    p.add_argument("--generation", choices=GENERATIONS, nargs="+", required=True)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--multipliers", default="8,8,8,4,4,4,4,4,4,4,4,4", help="per-layer, comma-separated")
    p.add_argument("--layer-weights", default="0.9163,0.9483,2.0762", help="comma-separated, or 'none'")
    p.add_argument("--per-channel", action="store_true", help="hidden_state_layer_weights of shape [3, width]")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--obj-vectors", type=int, default=2, help="size of the unused non-face input path (real: 77)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lw = None if a.layer_weights == "none" else [float(x) for x in a.layer_weights.split(",")]
    for gen in a.generation:
        out = a.out / gen if len(a.generation) > 1 else a.out
        path = write(out, gen, width=a.width, layers=a.layers, heads=a.heads, intermediate=a.intermediate,
                     multipliers=[int(x) for x in a.multipliers.split(",")], layer_weights=lw,
                     per_channel=a.per_channel, dtype=getattr(torch, a.dtype), vocab_size=a.vocab_size,
                     obj_vectors=a.obj_vectors, seed=a.seed)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
