"""Convert the authors' released AdaFace checkpoints into a `PromptInverter` folder, without running their code.

    python -m adaface.convert_released IN.pt OUT_DIR [--tokenizer CLIP_TOKENIZER]

The released files (`torch.save` pickles of whole modules) are read by `adaface._safe_unpickle`: only the
globals allowed below are resolved, each to an inert stand-in, so nothing named in the file is ever
imported or called. Recognised layouts ("generations"):
- 2024-05: classes under `ldm.*`; 12 top-level keys (`string_to_token`, `do_zero_shot`, ...);
- 1-key: only `string_to_subj_basis_generator_dict`;
- 2024-10: classes under `adaface.*`; the subject generator is a ModuleList [ConsistentID-based, Arc2Face-based];
- 2025: keys `string_to_subj_basis_generator_dict`, `placeholder_strings`, `subject_strings` and optionally
  `unet_lora_modules` (UNet LoRA weights, not used here).
The Arc2Face-based generator's inverse CLIP text model (`prompt2token_proj`) is the paper's Prompt Inverter
(§2.1). Its Dynamic Model Expansion (§2.2) expands K and V in the released code, not Q and V as the paper
says (`mode="kv"`): copy j of key t at slot t·m + j, one softmax over all L·m keys; the
per-layer multiplier m is read from the k_proj/v_proj shapes (the pickled multiplier attributes are not
reliable). Its `hidden_state_layer_weights` [3, 1] are applied normalised to sum 1, so they are stored
normalised. Everything else (the background generator, the ConsistentID-based generator, which needs models
adaface does not ship, the non-face input path, UNet LoRAs) is listed as ignored in
`OUT_DIR/conversion_report.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import _safe_unpickle as su
from .models._io import atomic_save_json, load_tokenizer

REPORT_NAME = "conversion_report.json"
GENERATORS_KEY = "string_to_subj_basis_generator_dict"
NUM_ID_TOKENS = 16
TEMPLATE = "photo of a"
SLOT_START = 4  # the authors' code writes the 16 ID tokens over positions 4..19
BYTES_PER_PARAMETER = 2  # every inverter parameter is copied from its own stored fp16/bf16/fp32 element

_KEYS_2024_05 = {"string_to_token", "string_to_static_embedder", "emb_global_scale_scores", "do_zero_shot",
                 "use_conv_attn_kernel_size"}
_KEYS_2025 = {GENERATORS_KEY, "placeholder_strings", "subject_strings", "unet_lora_modules"}
# Modules whose classes may appear, each stood in for by an inert class (see adaface._safe_unpickle).
_CLASS_MODULES = {
    "einops.layers.torch", "tokenizers", "transformers.activations", "transformers.tokenization_utils",
    "transformers.tokenization_utils_base",
    "ldm.modules.subj_basis_generator", "ldm.modules.arc2face_models", "ldm.util",
    "adaface.subj_basis_generator", "adaface.arc2face_models", "adaface.util",
}
_CLASS_PACKAGES = ("torch.nn.modules.", "transformers.models.clip.")
# The slow CLIPTokenizer's compiled pattern pickles as a call to regex's compile, and its text cleaner is
# ftfy's fix_text where ftfy was installed: both stood in for, never called.
_FUNCTIONS = {"regex._regex.compile", "ftfy.fix_text"}


class ConversionError(ValueError):
    """The file is a readable checkpoint but not one this converter can map onto a PromptInverter."""


def allowed_global(module: str, name: str) -> str | None:
    """"class" / "function" for a global the released files may name, None for anything else."""
    if f"{module}.{name}" in _FUNCTIONS:
        return "function"
    if not (name.isidentifier() and name[:1].isupper()):
        return None
    if module in _CLASS_MODULES or module.startswith(_CLASS_PACKAGES):
        return "class"
    return None


def _is(obj: Any, class_name: str) -> bool:
    name = su.global_name(obj)
    return name is not None and name.rsplit(".", 1)[-1] == class_name


def _items(container: Any) -> dict[str, Any]:
    """Entries of a pickled ModuleDict / ModuleList (stand-ins) or of a plain dict."""
    return dict(container) if isinstance(container, dict) else su.children(container)


def detect_generation(ckpt: dict, kinds: dict[str, str]) -> tuple[str, str]:
    """(generation, family of the authors' class paths: "ldm" / "adaface" / "none")."""
    families = {name.split(".", 1)[0] for name, kind in kinds.items() if kind != "torch"} & {"ldm", "adaface"}
    family = "+".join(sorted(families)) or "none"
    keys = set(ckpt)
    if keys == {GENERATORS_KEY}:
        return "1-key", family
    if keys & _KEYS_2024_05:
        return "2024-05", family
    if "token2num_vectors" in keys:
        return "2024-10", family
    if keys <= _KEYS_2025:
        return "2025", family
    return "unknown", family


def _tensor_summary(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _value_summary(v: Any) -> str:
    """A short description of a top-level value (never its repr: a pickled value may be nested arbitrarily)."""
    if isinstance(v, torch.Tensor):
        return f"tensor {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, su.StandIn):
        n = sum(1 for _ in su.named_tensors(v))
        return f"{v.global_name} ({n} tensors)"
    if isinstance(v, dict):
        return f"dict of {len(v)}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of {len(v)}"
    if isinstance(v, (str, int, float, bool, type(None))):
        return repr(v)[:80]
    return type(v).__name__


def _plain(v: Any) -> Any:
    """A pickled attribute for the JSON report: a number or a flat list of numbers, else its summary."""
    if isinstance(v, (int, float, type(None))) or (
            isinstance(v, (list, tuple)) and len(v) <= 1024 and all(isinstance(x, (int, float)) for x in v)):
        return list(v) if isinstance(v, tuple) else v
    return _value_summary(v)


def _pick_face_generator(ckpt: dict, report: dict) -> tuple[str, Any]:
    """The Arc2Face-based generator (and its path in the file); every other generator is reported skipped."""
    generators = _items(ckpt[GENERATORS_KEY])
    subjects = [s for s in ckpt.get("subject_strings") or [] if s in generators]
    picked: tuple[str, Any] | None = None
    for key, entry in generators.items():
        candidates = list(_items(entry).items()) if _is(entry, "ModuleList") else [(None, entry)]
        for idx, gen in candidates:
            where = f"{GENERATORS_KEY}[{key!r}]" + (f"[{idx}]" if idx is not None else "")
            if su.attr(gen, "placeholder_is_bg") or "prompt2token_proj" not in su.children(gen):
                report["skipped"].append({"path": where, "what": "background generator",
                                          "why": "AdaFace's face encoder does not use it"})
                continue
            n_id = su.attr(gen, "N_ID")
            # The authors' joint files order the list [ConsistentID-based, Arc2Face-based]; N_ID says 4 vs 16.
            consistent_id = n_id not in (None, NUM_ID_TOKENS) or (
                idx is not None and n_id is None and int(idx) != len(candidates) - 1)
            if consistent_id:
                report["skipped"].append({"path": where, "what": "ConsistentID-based generator",
                                          "why": "its input comes from ConsistentID's models, which adaface does "
                                                 "not ship"})
                continue
            if picked is not None and (not subjects or key not in subjects):
                report["skipped"].append({"path": where, "what": "another face generator",
                                          "why": f"{picked[0]} was converted"})
                continue
            if picked is not None:
                report["skipped"].append({"path": picked[0], "what": "another face generator",
                                          "why": f"{where} (a subject string) was converted"})
            picked = (where, gen)
    if picked is None:
        raise ConversionError("no Arc2Face-based subject generator (one holding prompt2token_proj) in the file")
    return picked


def _text_parts(proj: Any) -> tuple[Any, Any, list[Any], Any]:
    """(embeddings, encoder, layers, final_layer_norm) of the pickled CLIP text model (4.x or flat layout)."""
    inner = su.children(proj).get("text_model", proj)
    parts = su.children(inner)
    encoder = parts.get("encoder")
    if encoder is None or "embeddings" not in parts or "final_layer_norm" not in parts:
        raise ConversionError(
            f"prompt2token_proj ({su.global_name(proj)}) is not a CLIP text model "
            "(no embeddings / encoder / final_layer_norm)"
        )
    layers = list(_items(su.children(encoder).get("layers")).values())
    if not layers:
        raise ConversionError("prompt2token_proj has no encoder layers")
    return parts["embeddings"], encoder, layers, parts["final_layer_norm"]


def _child(module: Any, name: str, what: str) -> Any:
    child = su.children(module).get(name)
    if child is None:
        raise ConversionError(f"{what}.{name} is missing")
    return child


def _weight(module: Any, what: str, name: str = "weight") -> torch.Tensor:
    t = su.own_tensors(module).get(name)
    if t is None:
        raise ConversionError(f"{what}.{name} is missing")
    return t


def _config_of(proj: Any) -> dict:
    for holder in (proj, su.children(proj).get("text_model")):
        cfg = su.attr(holder, "config") if holder is not None else None
        if isinstance(cfg, su.StandIn):
            return {k: v for k, v in cfg.__dict__.items() if not k.startswith("_stand_in")}
    return {}


def _layer_multiplier(i: int, attn: Any, hidden: int) -> int:
    rows = {}
    for p in ("k", "v", "q"):
        w = _weight(_child(attn, f"{p}_proj", f"layer {i} self_attn"), f"layer {i} self_attn.{p}_proj")
        if w.dim() != 2 or w.shape[1] != hidden or w.shape[0] % hidden:
            raise ConversionError(
                f"layer {i} self_attn.{p}_proj.weight has shape {list(w.shape)}; expected [m*{hidden}, {hidden}]")
        rows[p] = w.shape[0] // hidden
    if rows["q"] != 1:
        raise ConversionError(f"layer {i}: q_proj is expanded ({rows['q']} copies); the released inverters expand "
                              "only K and V")
    if rows["k"] != rows["v"]:
        raise ConversionError(f"layer {i}: k_proj has {rows['k']} copies but v_proj {rows['v']}")
    return rows["k"]


def _layer_weights(gen: Any, hidden: int, report: dict) -> torch.Tensor:
    w = su.own_tensors(gen).get("hidden_state_layer_weights")
    if w is None:
        # Scheme "none": the authors' forward takes the last hidden state alone.
        report["layer_weights_source"] = "none (last hidden state only)"
        return torch.tensor([0.0, 0.0, 1.0])
    w = w.detach().float()
    report["layer_weights_source"] = {"pickled": w.flatten().tolist() if w.numel() <= 3 else _tensor_summary(w)}
    if w.dim() == 2 and w.shape[1] == hidden and w.shape[1] > 1:
        if not torch.equal(w, w[:, :1].expand_as(w)):
            raise ConversionError(
                f"hidden_state_layer_weights is per channel ({list(w.shape)}); PromptInverter mixes the last "
                "three layers with one weight each"
            )
        w = w[:, :1]
    w = w.flatten()
    if w.numel() != 3:
        raise ConversionError(f"hidden_state_layer_weights has {w.numel()} entries; expected 3 (the last 3 layers)")
    total = w.sum()
    if not torch.isfinite(w).all() or abs(float(total)) < 1e-6:
        raise ConversionError(f"hidden_state_layer_weights {w.tolist()} cannot be normalised to sum 1")
    return w / total


def _pickled_tokenizer(gen: Any) -> Any | None:
    """A real CLIPTokenizer rebuilt from the vocabulary and merges the pickled slow tokenizer holds."""
    tok = su.attr(gen, "tokenizer")
    encoder, ranks = su.attr(tok, "encoder"), su.attr(tok, "bpe_ranks")
    if not isinstance(encoder, dict) or not isinstance(ranks, dict):
        return None
    merges = [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(encoder))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return load_tokenizer(tmp)


def _template(gen: Any, tokenizer: str | os.PathLike | None, length: int, vocab: int,
              report: dict) -> list[int]:
    from .models.prompt_inverter import template_input_ids

    if tokenizer is not None:
        tok, report["tokenizer"] = load_tokenizer(tokenizer), str(tokenizer)
    else:
        tok = _pickled_tokenizer(gen)
        if tok is None:
            raise ConversionError(
                "this file holds no tokenizer; pass --tokenizer (a CLIP tokenizer folder or hub id, e.g. "
                "openai/clip-vit-large-patch14 or an SD-1.5 pipeline folder)"
            )
        report["tokenizer"] = "rebuilt from the tokenizer pickled in the file"
    ids, slot_start = template_input_ids(tok, TEMPLATE, NUM_ID_TOKENS, length)
    if slot_start != SLOT_START:
        raise ConversionError(
            f"the tokenizer splits {TEMPLATE!r} into {slot_start - 1} tokens; the released inverters put the ID "
            f"tokens at positions {SLOT_START}..{SLOT_START + NUM_ID_TOKENS - 1} (3 tokens)"
        )
    if max(ids) >= vocab:
        raise ConversionError(f"the tokenizer's ids reach {max(ids)}, beyond the model's {vocab}-row token table")
    return ids


def _check_declared_size(in_path: Path, gen: Any, vocab: int, hidden: int, positions: int, inter: int,
                         multipliers: list[int]) -> None:
    """Refuse, before allocating it, an inverter larger than the tensors the file stores could fill.

    The shapes come from the file; a small file can name the same layer a thousand times. Every parameter
    is copied from a distinct stored element of at least 16 bits, so the inverter can have at most one
    parameter per BYTES_PER_PARAMETER bytes of the generator's tensor data.
    """
    from .models.prompt_inverter import inverter_parameters

    params = inverter_parameters(vocab, hidden, positions, inter, multipliers)
    stored: dict[int, int] = {}
    for _, t in su.named_tensors(gen):
        storage = t.untyped_storage()
        stored[storage.data_ptr()] = storage.nbytes()
    available = sum(stored.values())
    if params * BYTES_PER_PARAMETER > available:
        raise ConversionError(
            f"{in_path}: its shapes declare an inverter of {params:,} parameters but the generator stores only "
            f"{available:,} bytes of tensors (limit BYTES_PER_PARAMETER = {BYTES_PER_PARAMETER}); refused"
        )


def convert_released(
    in_path: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None
) -> dict:
    """Convert one released checkpoint; writes `save_pretrained` files and the report into `out_dir`."""
    out_dir = Path(out_dir)
    # The loaded file (memory-mapped) is released when build_inverter returns, before the output is written.
    inverter, report = build_inverter(in_path, tokenizer=tokenizer)
    gc.collect()
    inverter.save_pretrained(out_dir)
    report["output"] = {"dir": str(out_dir.resolve()), "files": ["config.json", "model.safetensors", REPORT_NAME]}
    atomic_save_json(json.loads(json.dumps(report, default=str)), out_dir / REPORT_NAME)
    return report


def build_inverter(in_path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> tuple[Any, dict]:
    """Read a released checkpoint safely and rebuild its Arc2Face-based inverter; returns (PromptInverter, report)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models._clip_text import clip_text_parts
    from .models.prompt_inverter import PromptInverter

    in_path = Path(in_path)
    ckpt, kinds = su.load_with_stand_ins(in_path, allowed_global)
    if not isinstance(ckpt, dict) or GENERATORS_KEY not in ckpt:
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"{in_path}: not a released AdaFace checkpoint (no {GENERATORS_KEY!r}; found {keys})")
    generation, family = detect_generation(ckpt, kinds)
    report: dict[str, Any] = {
        "source": {"path": str(in_path.resolve()), "size_bytes": in_path.stat().st_size},
        "generation": generation, "class_paths": family,
        "top_level_keys": {str(k): _value_summary(v) for k, v in ckpt.items()},
        "globals": dict(sorted(kinds.items())),
        "skipped": [], "ignored": [],
    }
    for key in ckpt:
        if key != GENERATORS_KEY:
            report["ignored"].append({"path": str(key), "why": "training-time bookkeeping or UNet weights "
                                      "(not part of the face encoder)"})
    where, gen = _pick_face_generator(ckpt, report)
    proj = su.children(gen)["prompt2token_proj"]
    embeddings, _, layers, final_ln = _text_parts(proj)
    tok_table = _weight(_child(embeddings, "token_embedding", "embeddings"), "embeddings.token_embedding")
    pos_table = _weight(_child(embeddings, "position_embedding", "embeddings"), "embeddings.position_embedding")
    vocab, hidden = tok_table.shape
    cfg = _config_of(proj)
    heads = cfg.get("num_attention_heads") or su.attr(_child(layers[0], "self_attn", "layer 0"), "num_heads")
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise ConversionError(f"cannot tell the number of attention heads (config says {heads!r}, width {hidden})")
    multipliers = [_layer_multiplier(i, _child(layer, "self_attn", f"layer {i}"), hidden)
                   for i, layer in enumerate(layers)]
    fc1 = _weight(_child(_child(layers[0], "mlp", "layer 0"), "fc1", "layer 0 mlp"), "layer 0 mlp.fc1")
    eps = su.attr(final_ln, "eps", cfg.get("layer_norm_eps", 1e-5))
    special = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if isinstance(cfg.get(k), int)}
    text_config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=fc1.shape[0],
        projection_dim=cfg.get("projection_dim", hidden), num_hidden_layers=len(layers), num_attention_heads=heads,
        max_position_embeddings=pos_table.shape[0], hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(eps), attention_dropout=0.0, **special,
    )
    _check_declared_size(in_path, gen, vocab, hidden, pos_table.shape[0], fc1.shape[0], multipliers)
    layer_weights = _layer_weights(gen, hidden, report)
    ids = _template(gen, tokenizer, pos_table.shape[0], vocab, report)

    # Build the inverter at the file's multipliers, then copy every tensor into place (fp32).
    inverter = PromptInverter(CLIPTextModel(text_config).eval(), num_id_tokens=NUM_ID_TOKENS, template=TEMPLATE,
                              input_ids=ids, slot_start=SLOT_START, mode="kv")
    if any(m > 1 for m in multipliers):
        inverter.expand(multipliers, mode="kv", noise_ratio=0.0)
    used: set[int] = set()
    source_dtypes: set[str] = set()

    def put(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
        if dst.shape != src.shape:
            raise ConversionError(f"{what} has shape {list(src.shape)}; expected {list(dst.shape)}")
        dst.copy_(src)
        used.add(id(src))
        source_dtypes.add(str(src.dtype).removeprefix("torch."))

    with torch.no_grad():
        parts = clip_text_parts(inverter.text_encoder)
        put(parts.embeddings.token_embedding.weight, tok_table, "token_embedding.weight")
        put(parts.embeddings.position_embedding.weight, pos_table, "position_embedding.weight")
        for i, (src_layer, dst_layer) in enumerate(zip(layers, parts.layers)):
            src = {n: _child(src_layer, n, f"layer {i}") for n in ("self_attn", "layer_norm1", "layer_norm2", "mlp")}
            src_attn, dst_attn = src["self_attn"], dst_layer.self_attn
            m = multipliers[i]
            for p in ("q", "k", "v", "out"):
                lin, dst = _child(src_attn, f"{p}_proj", f"layer {i} self_attn"), getattr(dst_attn, f"{p}_proj")
                w, b = _weight(lin, f"layer {i} {p}_proj"), _weight(lin, f"layer {i} {p}_proj", "bias")
                if b.shape != (w.shape[0],):
                    raise ConversionError(f"layer {i} {p}_proj.bias has shape {list(b.shape)}; expected [{w.shape[0]}]")
                if p in ("k", "v") and m > 1:
                    # Copy j is the j-th block of `hidden` output rows (the authors' view puts it at slot t*m+j).
                    put(dst.weight, w[:hidden], f"layer {i} {p}_proj.weight[:{hidden}]")
                    put(dst.bias, b[:hidden], f"layer {i} {p}_proj.bias[:{hidden}]")
                    put(getattr(dst_attn, f"{p}_extra_weight"), w[hidden:].view(m - 1, hidden, hidden),
                        f"layer {i} {p}_proj.weight[{hidden}:]")
                    put(getattr(dst_attn, f"{p}_extra_bias"), b[hidden:].view(m - 1, hidden),
                        f"layer {i} {p}_proj.bias[{hidden}:]")
                    used.update((id(w), id(b)))
                else:
                    put(dst.weight, w, f"layer {i} {p}_proj.weight")
                    put(dst.bias, b, f"layer {i} {p}_proj.bias")
            for name in ("layer_norm1", "layer_norm2"):
                put(getattr(dst_layer, name).weight, _weight(src[name], f"layer {i} {name}"), f"layer {i} {name}")
                put(getattr(dst_layer, name).bias, _weight(src[name], f"layer {i} {name}", "bias"),
                    f"layer {i} {name}.bias")
            for name in ("fc1", "fc2"):
                dst = getattr(dst_layer.mlp, name)
                fc = _child(src["mlp"], name, f"layer {i} mlp")
                put(dst.weight, _weight(fc, f"layer {i} mlp.{name}"), f"layer {i} mlp.{name}.weight")
                put(dst.bias, _weight(fc, f"layer {i} mlp.{name}", "bias"), f"layer {i} mlp.{name}.bias")
        put(parts.final_layer_norm.weight, _weight(final_ln, "final_layer_norm"), "final_layer_norm.weight")
        put(parts.final_layer_norm.bias, _weight(final_ln, "final_layer_norm", "bias"), "final_layer_norm.bias")
        inverter.layer_weights.copy_(layer_weights)

    # What the generator held besides the inverter's tensors.
    for name, t in su.named_tensors(gen):
        if id(t) in used or name == "hidden_state_layer_weights":
            continue
        why = ("recomputed (position ids)" if name.endswith("position_ids") else
               "non-face subjects' input path" if name.startswith(("obj_proj_in.", "pos_embs")) else
               "not part of the 16-token face encoder")
        report["ignored"].append({"path": f"{where}.{name}", **_tensor_summary(t), "why": why})
    layerwise = su.children(gen).get("layerwise_proj")
    if layerwise is not None and not _is(layerwise, "Identity"):
        raise ConversionError(f"{where} applies a layerwise_proj ({su.global_name(layerwise)}) after the inverter; "
                              "PromptInverter has no equivalent")

    report["converted"] = {
        "path": f"{where}.prompt2token_proj",
        "multipliers": multipliers,
        "pickled_multiplier_attributes": _plain(su.attr(gen, "prompt2token_proj_attention_multipliers",
                                                        su.attr(gen, "prompt2token_proj_attention_multiplier"))),
        "mode": "kv",
        "hidden_size": hidden, "num_layers": len(layers), "num_heads": heads, "vocab_size": vocab,
        "layer_weights": layer_weights.tolist(),
        "source_dtypes": sorted(source_dtypes), "saved_dtype": "float32",
        "parameters": sum(p.numel() for p in inverter.parameters()),
        "input_ids": ids[:SLOT_START + NUM_ID_TOKENS + 1], "slot_start": SLOT_START,
    }
    return inverter, report


def build_parser() -> argparse.ArgumentParser:
    from ._cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m adaface.convert_released", formatter_class=HelpFormatter,
        description="Convert a released AdaFace checkpoint (.pt) into a PromptInverter folder for "
                    "`python -m adaface.generate --inverter OUT_DIR`, without running code from the file.",
    )
    p.add_argument("checkpoint", help="the released .pt file")
    p.add_argument("out_dir", help="folder to write config.json, model.safetensors and " + REPORT_NAME)
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer (folder or hub id) for the template; needed only when the file holds none "
                        "(2024-05 files), e.g. openai/clip-vit-large-patch14")
    p.add_argument("--overwrite", action="store_true", help="replace an inverter already in OUT_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._cli import OptionError
    from ._file_checks import check_readable, check_writable_dir, os_error_line
    from ._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    out = Path(args.out_dir).expanduser()
    try:
        check_writable_dir(args.out_dir, "OUT_DIR")
        check_readable(Path(args.checkpoint).expanduser(), "CHECKPOINT", args.checkpoint)
        if (out / "model.safetensors").exists() and not args.overwrite:
            raise ConversionError(f"out_dir {out}: already holds an inverter (pass --overwrite to replace it)")
        report = convert_released(Path(args.checkpoint).expanduser(), out, tokenizer=args.tokenizer)
    except (su.CheckpointError, ConversionError, OptionError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{parser.prog}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except (TypeError, KeyError, IndexError, AttributeError, ValueError, RecursionError, MemoryError) as e:
        # A pickled attribute of an unexpected type met code that expected the released files' type.
        print(f"{parser.prog}: error: {args.checkpoint}: not a released checkpoint this converter can read "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 2
    c = report["converted"]
    print(f"converted {c['path']} ({report['generation']} file): {c['num_layers']} layers, width "
          f"{c['hidden_size']}, multipliers {c['multipliers']}, layer weights "
          f"{[round(w, 4) for w in c['layer_weights']]} -> {out} (report: {out / REPORT_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
