"""Dependency messages a user of our commands cannot act on, dropped where the command-line tools start.

Only these messages go; every other warning still shows. Libraries importing adaface keep their own logging.
- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil" — we use the
  PIL processors on purpose (torchvision is not a dependency);
- diffusers: "Cannot initialize model with low cpu memory usage because `accelerate` was not found" — loading
  works without it (the models load fully, then move);
- diffusers: "There are modules in ... that should be kept in float32: []" — an empty list: nothing is kept;
- diffusers: "`torch_dtype` is deprecated ... use `dtype`" — the older diffusers releases we support take only
  `torch_dtype`;
- FutureWarnings raised inside insightface about its own calls (e.g. scikit-image's
  `SimilarityTransform.estimate`): only insightface can change those calls.
"""

from __future__ import annotations

import logging
import re
import warnings

_LOG_NOISE = {
    "transformers.utils.import_utils": r"requires torchvision \(not installed\); falling back to",
    "diffusers.models.modeling_utils": r"low cpu memory usage because `accelerate` was not found"
                                       r"|that should be kept in float32: \[\]",
    "diffusers.pipelines.pipeline_utils": r"low cpu memory usage because `accelerate` was not found",
}


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_dependency_noise() -> None:
    """Install the filters (idempotent)."""
    for name, pattern in _LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface(\.|$)")
    warnings.filterwarnings("ignore", message=r"`torch_dtype` is deprecated", category=FutureWarning)
