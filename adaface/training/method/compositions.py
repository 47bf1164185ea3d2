"""Composition prompts for stage 2 (paper §2.3): the pool, and the four prompts of one subject.

Per subject, four prompts that share one initial noise (paper §2.3–2.4):
    subject-single       "a photo of z"                       z = the inverter's 16 embeddings
    subject-composition  "a photo of z, in the forest"
    class-single         "a photo of a woman"                 natural text, as in the paper
    class-composition    "a photo of a woman, in the forest"
The class prompts are plain sentences, encoded by the text encoder as any prompt is. The per-token deltas of the
prompt embeddings (eq. 3) compare positions, so after encoding the class prompts are laid out like the subject
prompts (`align_class_embeddings`): the template's tokens stay where they are, the encoded class word (the mean
over its tokens, the article dropped) fills the 16 subject slots scaled by 1/√16 — the 16 slots together then
have the norm of the one class token, and each slot's direction is the class token's (the per-token cosine does
not see the scale) — and the tokens after the class word (the composition, the end token, the padding) follow
the last slot. The attention maps and output features of the UNet need no alignment: they are compared per
head over spatial positions and per spatial position.

The composition is appended after the subject, so the causal text encoder gives the single and composition prompts
identical embeddings up to the subject's last slot (the class word's last token): those rows have an exactly
zero delta and are masked out by the loss (they carry no signal), not counted.

Per-token weights of the prompt-embedding delta, by position of the subject's composition prompt: BOS 0 (its
embedding is the same in every prompt), the shared prefix (template and subject slots) 1, composition-only tokens
(through the composition's end token) 0.25, padding after it 0.0625.

The pool: compositions are drawn from lists of actions, clothing, objects, backgrounds (added with probability
0.6), styles, lighting and shot types. A user file replaces it: a JSON object with some of those lists (keys as
in `DEFAULT_POOL`), or a text file with one complete composition per line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SUBJECT_TEMPLATE = "a photo of z"
PLACEHOLDER = "z"
NUM_SLOTS = 16
TOKEN_WEIGHTS = {"bos": 0.0, "shared": 1.0, "composition": 0.25, "padding": 0.0625}

DEFAULT_POOL: dict[str, list[str]] = {
    "actions": [
        "reading a book", "playing the guitar", "riding a bicycle", "drinking a cup of coffee", "cooking in a kitchen",
        "walking a dog", "holding an umbrella", "dancing", "running", "sitting on a bench", "painting on a canvas",
        "playing chess", "taking a selfie", "swimming", "climbing a rock wall", "eating an ice cream",
        "working on a laptop", "jumping in the air", "smiling at the camera", "waving a hand",
    ],
    "clothing": [
        "wearing a red hat", "wearing a chef hat", "wearing sunglasses", "wearing a leather jacket",
        "wearing a wedding dress", "wearing a business suit", "wearing a spacesuit", "wearing a cowboy hat",
        "wearing a winter coat and scarf", "wearing a superhero costume", "wearing a kimono", "wearing a hoodie",
        "wearing a knight's armor", "wearing a crown", "wearing headphones",
    ],
    "objects": [
        "with a dog", "with a cat", "with a bouquet of flowers", "with a birthday cake", "with a red balloon",
        "with a horse", "with a vintage car", "with a cup of tea", "with a pile of books", "with a parrot",
    ],
    "backgrounds": [
        "in the forest", "on the beach", "in the city at night", "in the snow", "on top of a mountain",
        "in a library", "in a cafe", "in outer space", "under water", "in a desert", "in front of the Eiffel Tower",
        "in a flower field", "on a busy street", "in a castle", "on a boat", "in the rain", "at a concert",
        "in a classroom", "in a jungle", "on the moon",
    ],
    "styles": [
        "oil painting style", "watercolor painting", "pencil sketch", "anime style", "pixel art",
        "in the style of a comic book", "cyberpunk style", "renaissance painting", "pop art", "3d render",
    ],
    "lighting": [
        "at sunset", "in golden hour light", "in neon light", "in dramatic lighting", "in soft morning light",
        "by candlelight",
    ],
    "shots": ["close-up shot", "full body shot", "wide angle shot", "side view", "from above"],
}
POOL_KEYS = tuple(DEFAULT_POOL)


class CompositionPool:
    """Draws compositions from lists, or from a fixed list of complete compositions (a text pool file)."""

    def __init__(self, lists: dict[str, Sequence[str]] | None = None, fixed: Sequence[str] | None = None,
                 background_p: float = 0.6, modifier_p: float = 0.3) -> None:
        self.fixed = [s.strip() for s in (fixed or []) if s.strip()]
        self.lists = {k: [s.strip() for s in v if s.strip()] for k, v in (lists or {}).items()} if not fixed else {}
        self.background_p, self.modifier_p = background_p, modifier_p
        if not self.fixed and not any(self.lists.values()):
            raise ValueError("the composition pool is empty")

    @classmethod
    def default(cls) -> CompositionPool:
        return cls(DEFAULT_POOL)

    @classmethod
    def from_file(cls, path: str | Path) -> CompositionPool:
        """A JSON object of lists (keys from POOL_KEYS) or a text file of one composition per line."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--compositions: file not found: {p}")
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--compositions: {p} is not valid JSON: {e}") from e
            if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                     for v in data.values()):
                raise ValueError(f"--compositions: {p} must hold a JSON object of lists of strings")
            unknown = sorted(set(data) - set(POOL_KEYS))
            if unknown:
                raise ValueError(f"--compositions: unknown list(s) in {p}: {', '.join(unknown)} (known: "
                                 f"{', '.join(POOL_KEYS)})")
            try:
                return cls(data)
            except ValueError as e:
                raise ValueError(f"--compositions: {p}: {e}") from e
        lines = [s for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
        if not lines:
            raise ValueError(f"--compositions: {p}: the composition pool is empty")
        return cls(fixed=lines)

    def _pick(self, key: str, g: torch.Generator) -> str:
        items = self.lists[key]
        return items[int(torch.randint(len(items), (1,), generator=g))]

    def sample(self, generator: torch.Generator) -> str:
        """One composition, e.g. "wearing a red hat, in the forest, at sunset"."""
        if self.fixed:
            return self.fixed[int(torch.randint(len(self.fixed), (1,), generator=generator))]
        have = [k for k in POOL_KEYS if self.lists.get(k)]
        main = [k for k in ("actions", "clothing", "objects") if k in have]
        parts = [self._pick(main[int(torch.randint(len(main), (1,), generator=generator))], generator)] if main else []
        if "backgrounds" in have and (not parts or float(torch.rand((), generator=generator)) < self.background_p):
            parts.append(self._pick("backgrounds", generator))
        for key in ("lighting", "styles", "shots"):
            if key in have and (not parts or float(torch.rand((), generator=generator)) < self.modifier_p):
                parts.append(self._pick(key, generator))
        return ", ".join(parts)


@dataclass
class FourPrompts:
    """The prompts of a batch of subjects and the per-token weights of the prompt-embedding delta."""

    single: list[str]  # "a photo of z" per subject
    composition: list[str]  # "a photo of z, <composition>"
    class_words: list[str]
    token_weights: torch.Tensor  # [B, L] float32, by position of the subject's composition prompt
    slot_start: int  # index of the first of the 16 subject slots (the same in both subject prompts)
    class_single: list[str]  # "a photo of a woman"
    class_composition: list[str]  # "a photo of a woman, <composition>"
    class_ids: torch.Tensor  # [2B, L] token ids of class_single + class_composition
    class_spans: list[tuple[int, int]]  # per subject, [start, end) of the class word's tokens (both class prompts)

    def class_token_mask(self, length: int | None = None) -> torch.Tensor:
        """[B, L] float32: 1 on the class word's tokens of each subject's class prompts."""
        mask = torch.zeros(len(self.class_spans), length or self.class_ids.shape[1])
        for i, (start, end) in enumerate(self.class_spans):
            mask[i, start:end] = 1.0
        return mask


def composition_prompt(composition: str, template: str = SUBJECT_TEMPLATE) -> str:
    return f"{template}, {composition}"


def token_weights(tokenizer: object, single: str, composition: str, num_slots: int = NUM_SLOTS,
                  length: int = 77) -> tuple[torch.Tensor, int]:
    """[length] weights of the composition prompt's positions (TOKEN_WEIGHTS) and the first slot's index."""
    from adaface.models.subject_prompt import subject_input_ids

    s_ids, start = subject_input_ids(tokenizer, single, num_slots, PLACEHOLDER, length)
    c_ids, c_start = subject_input_ids(tokenizer, composition, num_slots, PLACEHOLDER, length)
    if c_start != start:
        raise ValueError(f"the composition prompt {composition!r} moves the subject slots ({c_start} vs {start})")
    eos = tokenizer.eos_token_id
    shared_end = start + num_slots  # the composition starts right after the subject's last slot
    comp_end = c_ids.index(eos, shared_end) + 1 if eos in c_ids[shared_end:] else length
    w = torch.full((length,), TOKEN_WEIGHTS["padding"])
    w[1:shared_end] = TOKEN_WEIGHTS["shared"]
    w[shared_end:comp_end] = TOKEN_WEIGHTS["composition"]
    w[0] = TOKEN_WEIGHTS["bos"]
    return w, start


def class_phrase(word: str) -> str:
    """The class word with its indefinite article: "a woman", "an elderly man" (kept when it has one)."""
    word = " ".join(word.split())
    if word.lower().split(" ", 1)[0] in ("a", "an", "the"):
        return word
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def class_word_span(tokenizer: object, template: str, word: str) -> tuple[int, int]:
    """[start, end) of the class word's tokens (its article excluded) in the class prompt made from `template`."""
    from adaface.models.subject_prompt import split_on_placeholder

    before, _ = split_on_placeholder(template, PLACEHOLDER)
    phrase = class_phrase(word)
    first, _, rest = phrase.partition(" ")
    article = first if first.lower() in ("a", "an", "the") and rest else ""
    lead = tokenizer(f"{before}{article}".strip(), add_special_tokens=False).input_ids
    full = tokenizer(f"{before}{phrase}".strip(), add_special_tokens=False).input_ids
    if full[:len(lead)] != lead or len(full) == len(lead):
        raise ValueError(f"class word {word!r}: its tokens cannot be located in the class prompt")
    return 1 + len(lead), 1 + len(full)  # + BOS


def build_prompts(tokenizer: object, compositions: Sequence[str], class_words: Sequence[str],
                  template: str = SUBJECT_TEMPLATE, length: int = 77, num_slots: int = NUM_SLOTS) -> FourPrompts:
    """The four prompts of each subject (one composition and class word each), the class prompts' token ids and
    class-word spans, and the per-token weights of the prompt delta."""
    if len(compositions) != len(class_words):
        raise ValueError(f"one composition per class word, got {len(compositions)} and {len(class_words)}")
    single = [template] * len(compositions)
    comp = [composition_prompt(c, template) for c in compositions]
    rows, starts = zip(*(token_weights(tokenizer, s, c, length=length) for s, c in zip(single, comp)))
    cls_single = [template.replace(PLACEHOLDER, class_phrase(w), 1) for w in class_words]
    cls_comp = [composition_prompt(c, s) for c, s in zip(compositions, cls_single)]
    spans = [class_word_span(tokenizer, template, w) for w in class_words]
    for w, (start, end) in zip(class_words, spans):
        if end - start > num_slots:
            raise ValueError(f"class word {w!r} has {end - start} tokens, more than the {num_slots} subject slots")
    ids = tokenizer(cls_single + cls_comp, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    return FourPrompts(single, comp, list(class_words), torch.stack(rows), starts[0], cls_single, cls_comp, ids,
                       spans)


def encode_class_prompts(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[N, L, H] prompt embeddings of the class prompts' token ids, as the pipelines encode any prompt."""
    from adaface.models._clip_text import clip_text_parts, run_clip_text

    table = clip_text_parts(text_encoder).embeddings.token_embedding
    last, _ = run_clip_text(text_encoder, table(input_ids.to(table.weight.device)))
    return last


def align_class_embeddings(class_embeds: torch.Tensor, spans: Sequence[tuple[int, int]], slot_start: int,
                           num_slots: int = NUM_SLOTS) -> torch.Tensor:
    """[B, L, H] encoded class prompts → the subject prompts' layout (see the module docstring).

    Rows before `slot_start` (BOS and the template) stay; the 16 slots get the mean of the class word's encoded
    tokens / √16; the rows from the class word's end on follow the last slot, the remainder padded with the last
    row (the padding's embedding). `spans` [start, end) per row of `class_embeds`.
    """
    b, length, _ = class_embeds.shape
    if len(spans) != b:
        raise ValueError(f"one class-word span per prompt, got {len(spans)} for {b} prompts")
    tail = length - slot_start - num_slots
    rows = []
    for i, (start, end) in enumerate(spans):
        x = class_embeds[i]
        word = x[start:end].mean(0, keepdim=True) / num_slots ** 0.5
        after = x[end:end + tail]
        if after.shape[0] < tail:  # the article and the word take more than the 16 slots' room
            after = torch.cat([after, x[-1:].expand(tail - after.shape[0], -1)])
        rows.append(torch.cat([x[:slot_start], word.expand(num_slots, -1), after]))
    return torch.stack(rows)


def resolve_class_words(known: Sequence[str | None], default: str) -> list[str]:
    """The prepared data's class word per subject where known, else `default`."""
    return [w if isinstance(w, str) and w.strip() else default for w in known]
