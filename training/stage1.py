"""Stage 1 of AdaFace training (face distillation). Placeholder until the stage-1 trainer lands."""

from __future__ import annotations

import sys
import tempfile

from adaface.testing.tiny_models import save_tiny_sd15


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_sd15(tmp)
        print(f"tiny SD-1.5 built at {path}; the stage-1 trainer is not implemented yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
