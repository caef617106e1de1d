"""Top-k classes of images from a checkpoint or an ONNX export: scripts/predict.py ckpt=...|model=... inputs=PATH"""

import sys

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, script
from finetune.config import validate_tool


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from finetune.predict import run

    with script():
        result = run(validate_tool(cfg, required=("inputs",), positive=("batch_size", "top_k"),
                                   non_negative=("num_workers",)))
    if result["failed"]:
        sys.exit(2)  # some inputs could not be classified; they are named above


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
