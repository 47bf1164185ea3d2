"""Subject prompts: 16 subject embeddings in an ordinary prompt → `prompt_embeds` for any SD-1.5 pipeline.

`encode_prompt(tokenizer, text_encoder, "a photo of z in the forest", subject_embeds)` writes the 16 embeddings
as the input embeddings of 16 consecutive tokens where the placeholder word stands, and runs the base model's
own CLIP text encoder over the whole prompt exactly as diffusers' SD-1.5 pipelines do (77 tokens, padded with
the tokenizer's pad token, truncated to 77, no attention mask; the final-layer-normed last hidden state).

Placeholder rule: the placeholder must appear exactly once as a whole word (`z` matches in `of z,` and `z's`,
not in `pizza` or `z_1`); zero or several occurrences raise a ValueError. Text past 77 tokens is truncated like
the pipelines do; a truncation that would cut into the 16 subject slots raises a ValueError.

`save_textual_inversion(embeddings, path, token="<z>")` writes the standard diffusers multi-vector file, one
key `{token: [16, H]}`; `pipe.load_textual_inversion(path)` adds tokens `<z>`, `<z>_1` … `<z>_15` and rewrites
`<z>` in prompts to those 16 tokens, which gives the same `prompt_embeds` as `encode_prompt` with
`placeholder="<z>"` (or with `z` for the same prompt written with `z`). The token must not be a word already in
the tokenizer's vocabulary — diffusers refuses those, and plain `z` is one (every single byte is a CLIP token).
Note that diffusers rewrites the token with a plain string replace, so pick a token that does not occur inside
other words of your prompts (the bracketed default does not).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ._clip_text import clip_text_parts, run_clip_text
from ._io import PathLike, atomic_save_safetensors

DEFAULT_PLACEHOLDER = "z"
DEFAULT_TI_TOKEN = "<z>"


def placeholder_pattern(placeholder: str) -> re.Pattern:
    """The placeholder as a whole word: `z` in "of z," but not in "pizza" or "z_1"."""
    return re.compile(r"(?<![A-Za-z0-9_])" + re.escape(placeholder) + r"(?![A-Za-z0-9_])")


def split_on_placeholder(prompt: str, placeholder: str) -> tuple[str, str]:
    """The text before and after the one occurrence of `placeholder`; ValueError unless there is exactly one."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    hits = list(placeholder_pattern(placeholder).finditer(prompt))
    if len(hits) != 1:
        raise ValueError(
            f"prompt must contain the subject placeholder {placeholder!r} exactly once as a word, "
            f"found {len(hits)} in {prompt!r}"
        )
    return prompt[: hits[0].start()], prompt[hits[0].end():]


def subject_input_ids(
    tokenizer: object, prompt: str, num_tokens: int, placeholder: str, length: int
) -> tuple[list[int], int]:
    """Token ids of `prompt` with the placeholder as `num_tokens` slots (pad ids), and the first slot's index."""
    before, after = split_on_placeholder(prompt, placeholder)
    pre = tokenizer(before, add_special_tokens=False).input_ids if before.strip() else []
    post = tokenizer(after, add_special_tokens=False).input_ids if after.strip() else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    body = pre + [pad] * num_tokens + post
    start = 1 + len(pre)
    if start + num_tokens > length - 1:
        raise ValueError(
            f"prompt {prompt!r}: the {num_tokens} subject tokens would be truncated (they start at token {start} "
            f"of at most {length})"
        )
    ids = [tokenizer.bos_token_id, *body[: length - 2], tokenizer.eos_token_id]
    return ids + [pad] * (length - len(ids)), start


def encode_prompt(
    tokenizer: object,
    text_encoder: torch.nn.Module,
    prompt: str | list[str],
    subject_embeds: torch.Tensor,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> torch.Tensor:
    """`prompt_embeds [B, 77, H]` for one prompt or a list; `subject_embeds` `[N, H]` or `[B or 1, N, H]`.

    Gradients flow into `subject_embeds` (the stage-1/2 student path); the text encoder is used as given.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt must be a non-empty str or list of str")
    if not isinstance(subject_embeds, torch.Tensor):
        raise TypeError(
            f"subject_embeds must be a torch.Tensor [N, H] or [B, N, H], got {type(subject_embeds).__name__}"
        )
    embeds = subject_embeds.unsqueeze(0) if subject_embeds.dim() == 2 else subject_embeds
    parts = clip_text_parts(text_encoder)
    table = parts.embeddings.token_embedding
    hidden = table.weight.shape[1]
    if embeds.dim() != 3 or embeds.shape[-1] != hidden or embeds.shape[0] not in (1, len(prompts)):
        raise ValueError(
            f"subject_embeds must be [N, {hidden}] or [B, N, {hidden}] with B = 1 or {len(prompts)} (the number "
            f"of prompts), got {tuple(subject_embeds.shape)}"
        )
    n = embeds.shape[1]
    length = parts.embeddings.position_embedding.weight.shape[0]
    length = min(length, getattr(tokenizer, "model_max_length", length) or length)
    rows = []
    for i, p in enumerate(prompts):
        ids, start = subject_input_ids(tokenizer, p, n, placeholder, length)
        tok = table(torch.tensor(ids, device=table.weight.device))
        subj = embeds[i if embeds.shape[0] > 1 else 0].to(tok.dtype)
        rows.append(torch.cat([tok[:start], subj, tok[start + n:]]))
    last, _ = run_clip_text(text_encoder, torch.stack(rows))
    return last


def save_textual_inversion(embeddings: torch.Tensor, path: PathLike, token: str = DEFAULT_TI_TOKEN) -> Path:
    """Write `embeddings [N, H]` (or `[1, N, H]`) as a diffusers multi-vector textual-inversion safetensors file."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor [N, H], got {type(embeddings).__name__}")
    if embeddings.dim() == 3 and embeddings.shape[0] == 1:
        embeddings = embeddings[0]
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a float tensor [N, H], got {embeddings.dtype} {tuple(embeddings.shape)}")
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ValueError(f"token must be a non-empty string without whitespace, got {token!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors (diffusers picks the loader by extension), got {path}")
    atomic_save_safetensors({token: embeddings.detach().clone()}, path)
    return path
