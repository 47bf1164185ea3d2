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

Several subjects: `encode_subjects_prompt(tokenizer, text_encoder, "z and y at the beach", {"z": a, "y": b})`
writes each subject's embeddings where its own placeholder stands. A prompt may use any subset of the
placeholders (at least one), each at most once; every subject's slots must fit in the 77 tokens. With one
subject it is `encode_prompt`. `subject_slots` gives where each subject's slots start (the regional attention
of `adaface.models.regional_attention` needs them).
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


def find_placeholders(prompt: str, placeholders: list[str] | tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(placeholder, start, end) of each placeholder in `prompt`, in text order.

    ValueError when a placeholder occurs more than once, when none of them occurs, or when two overlap.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if len(placeholders) == 1:
        before, _ = split_on_placeholder(prompt, placeholders[0])  # the single-subject message
        return [(placeholders[0], len(before), len(before) + len(placeholders[0]))]
    found = []
    for placeholder in placeholders:
        hits = list(placeholder_pattern(placeholder).finditer(prompt))
        if len(hits) > 1:
            raise ValueError(
                f"prompt must contain the subject placeholder {placeholder!r} at most once as a word, "
                f"found {len(hits)} in {prompt!r}"
            )
        found += [(placeholder, h.start(), h.end()) for h in hits]
    if not found:
        raise ValueError(f"prompt must contain at least one of the subject placeholders {list(placeholders)} as a "
                         f"word: {prompt!r}")
    found.sort(key=lambda f: f[1])
    for (a, _, a_end), (b, b_start, _) in zip(found, found[1:]):
        if b_start < a_end:
            raise ValueError(f"placeholders {a!r} and {b!r} overlap in {prompt!r}")
    return found


def subject_slots(
    tokenizer: object, prompt: str, num_tokens: dict[str, int], length: int
) -> tuple[list[int], dict[str, int]]:
    """Token ids of `prompt` with each placeholder present as its subject's `num_tokens[placeholder]` slots (pad
    ids), and where each present subject's slots start. ValueError when the 77 tokens would cut a subject's slots."""
    found = find_placeholders(prompt, list(num_tokens))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []

    body: list[int] = []
    starts: dict[str, int] = {}
    cursor = 0
    for placeholder, begin, end in found:
        body += words(prompt[cursor:begin])
        starts[placeholder] = 1 + len(body)
        body += [pad] * num_tokens[placeholder]
        cursor = end
    body += words(prompt[cursor:])
    for placeholder, start in starts.items():
        n = num_tokens[placeholder]
        if start + n > length - 1:
            used = sum(num_tokens[p] for p in starts)
            raise ValueError(
                f"prompt {prompt!r}: the {n} tokens of subject {placeholder!r} would be truncated (they start at "
                f"token {start} of at most {length}; the prompt's {len(starts)} subject(s) take {used} positions)"
            )
    ids = [tokenizer.bos_token_id, *body[: length - 2], tokenizer.eos_token_id]
    return ids + [pad] * (length - len(ids)), starts


def subject_input_ids(
    tokenizer: object, prompt: str, num_tokens: int, placeholder: str, length: int
) -> tuple[list[int], int]:
    """Token ids of `prompt` with the placeholder as `num_tokens` slots (pad ids), and the first slot's index."""
    ids, starts = subject_slots(tokenizer, prompt, {placeholder: num_tokens}, length)
    return ids, starts[placeholder]


def _prompt_length(tokenizer: object, parts: object) -> int:
    length = parts.embeddings.position_embedding.weight.shape[0]
    return min(length, getattr(tokenizer, "model_max_length", length) or length)


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
    length = _prompt_length(tokenizer, parts)
    rows = []
    for i, p in enumerate(prompts):
        ids, start = subject_input_ids(tokenizer, p, n, placeholder, length)
        tok = table(torch.tensor(ids, device=table.weight.device))
        subj = embeds[i if embeds.shape[0] > 1 else 0].to(tok.dtype)
        rows.append(torch.cat([tok[:start], subj, tok[start + n:]]))
    last, _ = run_clip_text(text_encoder, torch.stack(rows))
    return last


def encode_subjects_prompt(
    tokenizer: object,
    text_encoder: torch.nn.Module,
    prompt: str,
    subjects: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, int]]:
    """`prompt_embeds [1, 77, H]` of one prompt with several subjects `{placeholder: [N, H]}`, and where each
    subject present in the prompt has its slots (`{placeholder: first slot}`)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not subjects:
        raise ValueError("subjects must name at least one {placeholder: embeddings [N, H]}")
    parts = clip_text_parts(text_encoder)
    table = parts.embeddings.token_embedding
    hidden = table.weight.shape[1]
    for placeholder, embeds in subjects.items():
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 2 or embeds.shape[-1] != hidden:
            raise ValueError(f"subject {placeholder!r}: embeddings must be a tensor [N, {hidden}], got "
                             f"{tuple(getattr(embeds, 'shape', ()))}")
    ids, starts = subject_slots(tokenizer, prompt, {p: e.shape[0] for p, e in subjects.items()},
                                _prompt_length(tokenizer, parts))
    row = table(torch.tensor(ids, device=table.weight.device))
    pieces, cursor = [], 0
    for placeholder, start in sorted(starts.items(), key=lambda item: item[1]):
        subject = subjects[placeholder]
        pieces += [row[cursor:start], subject.to(row.dtype)]
        cursor = start + subject.shape[0]
    pieces.append(row[cursor:])
    last, _ = run_clip_text(text_encoder, torch.cat(pieces)[None])
    return last, starts


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
