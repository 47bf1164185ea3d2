"""AdaFace stage 1 -- face distillation: train the Prompt Inverter to make SD-1.5 imitate Arc2Face.

    python training/stage1.py                          # tiny preset (training/configs/tiny.json), CPU, minutes
    python training/stage1.py --config training/configs/paper.json \\
        --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 --arc2face models/ --output-dir runs/stage1
    torchrun --nproc_per_node 2 training/stage1.py --config ...   # DDP
    python training/stage1.py ... --resume                # continue from the latest checkpoint

The stage (models, data, loss) is adaface.training.method.stage1; the loop, optimizer, expansion, DDP, checkpoints and
metrics are the shared trainer (adaface.training.engine.trainer). Outputs in OUTPUT_DIR: metrics.jsonl,
checkpoints/step-NNNNNNNN/ (safetensors + JSON, the last K), inverter/ (PromptInverter.save_pretrained) and,
for the tiny preset, tiny_models/.
"""

import sys
from pathlib import Path

from adaface.training.method.stage1 import main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "tiny.json")

if __name__ == "__main__":
    sys.exit(main(default_config=DEFAULT_CONFIG))
