"""AdaFace stage 2 -- composition distillation: teach the stage-1 Prompt Inverter to compose (paper §2.3-2.4).

    python training/stage2.py                          # tiny preset (training/configs/stage2_tiny.json), CPU, minutes
    python training/stage2.py --config training/configs/stage2_paper.json \\
        --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 --arc2face models/ \\
        --inverter runs/stage1/inverter --data-dir data/prepared --output-dir runs/stage2
    torchrun --nproc_per_node 2 training/stage2.py --config ...   # DDP
    python training/stage2.py ... --resume                # continue from the latest checkpoint

The stage (models, data, the composition step and the mixed-in stage-1 steps) is adaface.training.method.stage2; the
loop, optimizer, DDP, checkpoints and metrics are the shared trainer (adaface.training.engine.trainer). Outputs in
OUTPUT_DIR: metrics.jsonl, checkpoints/, inverter/, summary.json and, for the tiny preset, tiny_models/ and
synthetic_faces/.
"""

import sys
from pathlib import Path

from adaface.training.method.stage2 import main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "stage2_tiny.json")

if __name__ == "__main__":
    sys.exit(main(default_config=DEFAULT_CONFIG))
