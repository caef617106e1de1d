"""Top-k classes of images from a checkpoint or an ONNX export: scripts/predict.py ckpt=...|model=... inputs=PATH"""

import sys

import hydra
from omegaconf import DictConfig

from finetune.checks import validate_tool
from finetune.cli import expand_home_in_arguments, quiet_lightning, script


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with script():
        # checked before the back half (torch) loads: a bad value is one line, in seconds
        cfg = validate_tool(cfg, required=("inputs",), positive=("batch_size", "top_k"),
                            non_negative=("num_workers",))
        from finetune.predict import run

        quiet_lightning()
        result = run(cfg)
    if result["failed"]:
        sys.exit(2)  # some inputs could not be classified; they are named above


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
