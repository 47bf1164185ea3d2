"""AdaFace: face photos → 16 token embeddings in the CLIP text space, for unmodified SD-1.5 pipelines.

Public names are exported lazily so that `import adaface` (and `import adaface.ops`) only needs torch:
insightface, onnxruntime and diffusers are imported by the parts that use them, when first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "expand_clip_attention": "adaface.models.expanded_clip_attention",
    "ExpandedCLIPAttention": "adaface.models.expanded_clip_attention",
    "PromptInverter": "adaface.models.prompt_inverter",
    "Arc2Face": "adaface.models.arc2face",
    "FaceEncoder": "adaface.models.face_encoder",
    "encode_prompt": "adaface.models.subject_prompt",
    "save_textual_inversion": "adaface.models.subject_prompt",
    "SubjectEncoder": "adaface.subject",
    "encode_subject": "adaface.subject",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adaface' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
