"""Arc2Face, the Face2Image teacher (paper §2.1–2.2): ArcFace vector → CLIP-encoder context for its UNet.

The ArcFace vector (L2-normalised here, then zero-padded to the encoder width) replaces the token embedding of
the word `id` in `photo of a id person` (padded to 77 with the tokenizer's pad token, as Arc2Face does); the
encoder's final-layer-normed output `[B, 77, H]` is the UNet's whole cross-attention context
(`prompt_embeds`). `id_tokens` are its 16 positions 4..19 — the `id` token and everything after it (`person`,
`<eos>` and 13 padding positions), all of which see the ID through the causal mask. These are the
"image-space ID tokens" the Prompt Inverter learns to invert.

Released layout (hub repo `FoivosPar/Arc2Face`, downloaded into `models/`): `arc2face/` (diffusers UNet) and
`encoder/` (`config.json` + `pytorch_model.bin`, a pickle-format file that is only ever read with
`weights_only=True`). The release has no tokenizer: Arc2Face uses SD-1.5's, so pass `tokenizer=` (a tokenizer
folder, an SD-1.5 pipeline folder or a CLIPTokenizer); a `tokenizer/` folder inside the Arc2Face folder is
also picked up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._clip_text import clip_text_parts, run_clip_text
from ._io import (
    PathLike,
    check_config_file,
    check_model_size,
    check_model_source,
    is_local,
    load_clip_text_model,
    load_tokenizer,
)

PROMPT = "photo of a id person"
ID_WORD = "id"
NUM_ID_TOKENS = 16
ARCFACE_DIM = 512


class Arc2Face(nn.Module):
    """Arc2Face's ID encoder (a CLIPTextModel) and, optionally, its UNet; see the module docstring."""

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer: object,
        unet: nn.Module | None = None,
        *,
        prompt: str = PROMPT,
        id_word: str = ID_WORD,
        num_id_tokens: int = NUM_ID_TOKENS,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        self.tokenizer = tokenizer
        parts = clip_text_parts(text_encoder)
        length = parts.embeddings.position_embedding.weight.shape[0]
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        id_ids = tokenizer(id_word, add_special_tokens=False).input_ids
        if len(id_ids) != 1:
            raise ValueError(f"id_word {id_word!r} must be one token for this tokenizer, got {len(id_ids)}")
        where = [i for i, t in enumerate(ids) if t == id_ids[0]]
        if len(where) != 1:
            raise ValueError(f"prompt {prompt!r} must contain the id word {id_word!r} exactly once")
        self.id_position = where[0]
        if self.id_position + num_id_tokens > length:
            raise ValueError(f"{num_id_tokens} ID tokens from position {self.id_position} overrun {length} positions")
        self.num_id_tokens = num_id_tokens
        self.register_buffer("input_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.requires_grad_(False)  # a frozen teacher
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        *,
        tokenizer: object = None,
        load_unet: bool = True,
        encoder_subfolder: str = "encoder",
        unet_subfolder: str = "arc2face",
        dtype: torch.dtype | None = None,
    ) -> Arc2Face:
        """Load from the released layout, a local folder or a hub id (`FoivosPar/Arc2Face`).

        Every config of the folder (or of the hub repo's snapshot) is checked first, the UNet's included: none may
        load code, a quantizer or a hub kernel (`check_model_source`)."""
        root, pin = check_model_source(path)
        if is_local(path):
            needed = [encoder_subfolder] + ([unet_subfolder] if load_unet else [])
            missing = [s for s in needed if not (root / s / "config.json").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"Arc2Face: {', '.join(str(root / s) for s in missing)} missing; expected the released layout "
                    f"{root}/{encoder_subfolder}/ (config.json + pytorch_model.bin) and {root}/{unet_subfolder}/ "
                    "(diffusers UNet)"
                )
            tok = load_tokenizer(tokenizer, candidates=[root], what="tokenizer")
        else:
            tok = load_tokenizer(tokenizer, what="tokenizer") if tokenizer is not None else load_tokenizer(
                path, what="tokenizer"
            )
        if load_unet:  # also where the subfolder is nested deeper than check_model_source looks
            from diffusers import UNet2DConditionModel

            check_config_file(root / unet_subfolder / "config.json")
            check_model_size(path, UNet2DConditionModel, unet_subfolder, snapshot=(root, pin))
        text_encoder = load_clip_text_model(path, subfolder=encoder_subfolder, what="Arc2Face encoder")
        unet = None
        if load_unet:
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder=unet_subfolder, **pin).eval()
        model = cls(text_encoder, tok, unet)
        return model.to(dtype) if dtype is not None else model

    @property
    def hidden_size(self) -> int:
        return clip_text_parts(self.text_encoder).embeddings.token_embedding.weight.shape[1]

    def _check_arcface(self, arcface: torch.Tensor) -> torch.Tensor:
        if not isinstance(arcface, torch.Tensor):
            raise TypeError(f"arcface must be a torch.Tensor [B, {ARCFACE_DIM}], got {type(arcface).__name__}")
        if arcface.dim() == 1:
            arcface = arcface.unsqueeze(0)
        if arcface.dim() != 2 or arcface.shape[1] != ARCFACE_DIM or not arcface.is_floating_point():
            got = f"{arcface.dtype} {tuple(arcface.shape)}"
            raise ValueError(f"arcface must be a float tensor [B, {ARCFACE_DIM}], got {got}")
        return arcface

    def prompt_embeds(self, arcface: torch.Tensor) -> torch.Tensor:
        """ArcFace embeddings `[B, 512]` → the UNet's cross-attention context `[B, 77, H]`."""
        arcface = self._check_arcface(arcface)
        parts = clip_text_parts(self.text_encoder)
        table = parts.embeddings.token_embedding(self.input_ids)
        face = F.normalize(arcface.float(), dim=-1).to(table.dtype)
        face = F.pad(face, (0, self.hidden_size - face.shape[1])).unsqueeze(1)
        rows = table.unsqueeze(0).expand(face.shape[0], -1, -1)
        p = self.id_position
        embeds = torch.cat([rows[:, :p], face, rows[:, p + 1:]], dim=1)
        last, _ = run_clip_text(self.text_encoder, embeds)
        return last

    def id_tokens(self, arcface: torch.Tensor) -> torch.Tensor:
        """ArcFace embeddings `[B, 512]` → the 16 image-space ID tokens `[B, 16, H]` (positions 4..19)."""
        p = self.id_position
        return self.prompt_embeds(arcface)[:, p:p + self.num_id_tokens]
