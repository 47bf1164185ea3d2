"""The AdaFace Prompt Inverter (paper §2.1): 16 image-space ID tokens → 16 text-space token embeddings.

A CLIP text transformer initialised from pretrained CLIP text weights. Its input is the template
`<bos> photo of a [16 slots] <eos> <pad>...` (77 tokens): token embeddings from the frozen table with the
16 slots replaced by the ID tokens, plus the frozen position embeddings, under the usual causal mask. Its
output is a learned weighted sum of the last 3 layers' hidden states (weights initialised to 1:2:4,
normalised to sum 1, then learned freely — the final layer norm makes their overall scale irrelevant),
then the final layer norm; the 16 slot positions are w_1..w_16.

For the stage-1 trainer:
- `PromptInverter(text_encoder_or_path, tokenizer=..., num_id_tokens=16)` or `from_clip_text_encoder(...)`;
- `inverter(id_tokens [B, 16, H]) -> [B, 16, H]`;
- `inverter.multipliers` (per layer) and `inverter.expand(multipliers, noise_ratio=0.1, generator=None)`, which
  returns the `(name, Parameter)` pairs it created (names as in `inverter.named_parameters()`); the replaced
  parameters are `text_encoder.encoder.layers.{i}.self_attn.{q,v}_extra_{weight,bias}` (mode "qv"), all other
  parameters keep their identity and optimizer state;
- `save_pretrained(dir)` / `from_pretrained(dir)`: `config.json` + `model.safetensors`, never a pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._clip_text import clip_text_parts, run_clip_text
from ._io import (
    PathLike,
    UnsafeFileError,
    atomic_save_json,
    atomic_save_safetensors,
    check_structure,
    is_local,
    load_clip_text_model,
    load_tokenizer,
    read_model_config,
    safetensors_elements,
)
from .expanded_clip_attention import (
    _check_mode,
    clip_attention_multipliers,
    expand_clip_attention_with_params,
    expansion_elements,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "adaface-prompt-inverter"
DEFAULT_TEMPLATE = "photo of a"
LAYER_WEIGHTS_INIT = (1.0, 2.0, 4.0)


def inverter_parameters(vocab: int, hidden: int, positions: int, intermediate: int, multipliers: Sequence[int]) -> int:
    """The parameter count of a PromptInverter of these sizes (known before anything is allocated).

    Per layer: q, k, v, out projections (weight + bias), (m - 1) extra copies of the two expanded ones, two
    layer norms and the MLP; plus the token and position tables, the final layer norm and the 3 layer weights.
    """
    linear = hidden * hidden + hidden
    per_layer = [4 * linear + 2 * (m - 1) * linear + 4 * hidden + 2 * hidden * intermediate + intermediate + hidden
                 for m in multipliers]
    return (vocab + positions) * hidden + 2 * hidden + len(LAYER_WEIGHTS_INIT) + sum(per_layer)


def _declared_parameters(cfg: dict, path: Path) -> int:
    """inverter_parameters for a config.json's sizes, each checked to be a positive int first."""
    tc = cfg.get("text_config")
    keys = ("vocab_size", "hidden_size", "max_position_embeddings", "intermediate_size", "num_hidden_layers")
    mult = cfg.get("multipliers")
    if not isinstance(tc, dict) or not all(type(tc.get(k)) is int and tc[k] > 0 for k in keys) or not (
            isinstance(mult, list) and len(mult) == tc["num_hidden_layers"]
            and all(type(m) is int and m > 0 for m in mult)):
        raise UnsafeFileError(f"{path}: text_config needs positive integers {', '.join(keys)} and multipliers one "
                              "positive integer per layer")
    return inverter_parameters(*(tc[k] for k in keys[:4]), mult)


def template_input_ids(tokenizer: object, template: str, num_slots: int, length: int) -> tuple[list[int], int]:
    """`<bos> template [slots] <eos> <pad>...` as ids, and the index of the first slot."""
    words = tokenizer(template, add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = [bos, *words, *([eos] * num_slots), eos]
    if len(ids) > length:
        raise ValueError(f"template {template!r} plus {num_slots} slots needs {len(ids)} tokens, more than {length}")
    return ids + [pad] * (length - len(ids)), 1 + len(words)


class PromptInverter(nn.Module):
    """CLIP-text-architecture inverter; see the module docstring.

    `text_encoder`: a CLIPTextModel instance (used as is, not copied), a CLIPTextConfig (random weights), a
    CLIP text encoder folder, an SD-1.5 pipeline folder (its `text_encoder/`) or a hub id.
    `tokenizer`: the CLIP tokenizer that builds the template (instance or folder); found beside a local
    `text_encoder` when omitted. Not needed when `input_ids` (the 77 template ids) and `slot_start` are given.
    """

    def __init__(
        self,
        text_encoder: object,
        *,
        tokenizer: object = None,
        num_id_tokens: int = 16,
        template: str = DEFAULT_TEMPLATE,
        input_ids: Sequence[int] | None = None,
        slot_start: int | None = None,
        mode: str = "qv",
    ) -> None:
        super().__init__()
        self._mode = _check_mode(mode)
        if isinstance(num_id_tokens, bool) or not isinstance(num_id_tokens, int) or num_id_tokens < 1:
            raise ValueError(f"num_id_tokens must be an int >= 1, got {num_id_tokens!r}")
        self.text_encoder = _as_text_model(text_encoder)
        self.num_id_tokens = num_id_tokens
        parts = clip_text_parts(self.text_encoder)
        length = parts.embeddings.position_embedding.weight.shape[0]
        if input_ids is None:
            candidates = [Path(text_encoder), Path(text_encoder).parent] if is_local(text_encoder) else []
            tok = load_tokenizer(tokenizer, candidates=candidates) if tokenizer is not None or candidates \
                else load_tokenizer(text_encoder)
            input_ids, slot_start = template_input_ids(tok, template, num_id_tokens, length)
        if slot_start is None or len(input_ids) != length or not 0 < slot_start <= length - num_id_tokens:
            raise ValueError(f"input_ids must hold {length} ids and slot_start a valid slot index, got {slot_start}")
        self.template = template
        self.slot_start = int(slot_start)
        self.register_buffer("input_ids", torch.tensor(list(input_ids), dtype=torch.long), persistent=False)
        w = torch.tensor(LAYER_WEIGHTS_INIT)
        self.layer_weights = nn.Parameter(w / w.sum())
        # The token and position tables are the CLIP input space the outputs must live in: never trained.
        parts.embeddings.requires_grad_(False)

    @classmethod
    def from_clip_text_encoder(cls, text_encoder: object, **kwargs: object) -> PromptInverter:
        return cls(text_encoder, **kwargs)

    @property
    def hidden_size(self) -> int:
        return clip_text_parts(self.text_encoder).embeddings.token_embedding.weight.shape[1]

    @property
    def multipliers(self) -> list[int]:
        return clip_attention_multipliers(self.text_encoder)

    @property
    def mode(self) -> str:
        modes = {layer.self_attn.mode for layer in clip_text_parts(self.text_encoder).layers
                 if hasattr(layer.self_attn, "mode")}
        return modes.pop() if modes else self._mode

    def expand(
        self,
        multipliers: int | Sequence[int],
        *,
        mode: str | None = None,
        noise_ratio: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> list[tuple[str, nn.Parameter]]:
        """Dynamic model expansion to the per-layer totals `multipliers`; returns the new (name, Parameter)s."""
        new = expand_clip_attention_with_params(
            self.text_encoder, multipliers, mode=mode or self.mode, noise_ratio=noise_ratio, generator=generator
        )
        return [(f"text_encoder.{name}", p) for name, p in new]

    def expansion_size(self, multipliers: int | Sequence[int]) -> int:
        """The tensor elements `expand(multipliers)` would add (nothing is allocated to count them)."""
        return expansion_elements(self.text_encoder, multipliers, mode=self.mode)

    def forward(self, id_tokens: torch.Tensor) -> torch.Tensor:
        """ID tokens `[B, num_id_tokens, H]` → text-space token embeddings `[B, num_id_tokens, H]`."""
        if not isinstance(id_tokens, torch.Tensor):
            raise TypeError(f"id_tokens must be a torch.Tensor, got {type(id_tokens).__name__}")
        if id_tokens.dim() != 3 or id_tokens.shape[1:] != (self.num_id_tokens, self.hidden_size):
            raise ValueError(
                f"id_tokens must have shape [B, {self.num_id_tokens}, {self.hidden_size}], got {tuple(id_tokens.shape)}"
            )
        parts = clip_text_parts(self.text_encoder)
        table = parts.embeddings.token_embedding(self.input_ids).unsqueeze(0).expand(id_tokens.shape[0], -1, -1)
        a, b = self.slot_start, self.slot_start + self.num_id_tokens
        embeds = torch.cat([table[:, :a], id_tokens.to(table.dtype), table[:, b:]], dim=1)
        _, states = run_clip_text(self.text_encoder, embeds)
        last = states[-len(self.layer_weights):]
        mixed = sum(w.to(s.dtype) * s for w, s in zip(self.layer_weights, last))
        return parts.final_layer_norm(mixed)[:, a:b]

    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": 1,
            "num_id_tokens": self.num_id_tokens,
            "template": self.template,
            "input_ids": self.input_ids.tolist(),
            "slot_start": self.slot_start,
            "multipliers": self.multipliers,
            "mode": self.mode,
            "text_config": self.text_encoder.config.to_dict(),
        }

    def save_pretrained(self, directory: PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.state_dict(), directory / WEIGHTS_NAME, metadata={"format": FORMAT})
        atomic_save_json(self.config_dict(), directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, device: str | torch.device | None = None) -> PromptInverter:
        """Rebuild the architecture from `config.json`, then load `model.safetensors` (strict; no unpickling)."""
        from safetensors.torch import load_file
        from transformers import CLIPTextConfig, CLIPTextModel

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"PromptInverter.from_pretrained: {p} not found (written by save_pretrained)")
        cfg = read_model_config(cfg_path)
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a PromptInverter config (format {cfg.get('format')!r})")
        # The sizes the config declares are allocated below: the weights file must hold that many elements, in
        # no more layers than MAX_LAYERS (each costs Python objects beyond its weights).
        check_structure(cfg, cfg_path)
        declared, stored = _declared_parameters(cfg, cfg_path), safetensors_elements(w_path)
        if declared != stored:
            raise UnsafeFileError(f"{cfg_path}: declares a model of {declared:,} parameters but {w_path} holds "
                                  f"{stored:,}; refused before allocating it")
        text_config = CLIPTextConfig.from_dict(cfg["text_config"])
        model = cls(
            CLIPTextModel(text_config).eval(),
            num_id_tokens=cfg["num_id_tokens"],
            template=cfg["template"],
            input_ids=cfg["input_ids"],
            slot_start=cfg["slot_start"],
            mode=cfg["mode"],
        )
        if any(m > 1 for m in cfg["multipliers"]):
            model.expand(cfg["multipliers"], mode=cfg["mode"], noise_ratio=0.0)
        model.load_state_dict(load_file(str(w_path), device=str(device or "cpu")), strict=True)
        return model.to(device) if device is not None else model


def _as_text_model(text_encoder: object) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    if isinstance(text_encoder, nn.Module):
        clip_text_parts(text_encoder)  # raises a TypeError naming what was expected
        return text_encoder
    if isinstance(text_encoder, CLIPTextConfig):
        return CLIPTextModel(text_encoder).eval()
    return load_clip_text_model(text_encoder, what="text_encoder")
