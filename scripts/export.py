"""A checkpoint as ONNX or TorchScript, checked for parity: uv run scripts/export.py ckpt=... format=onnx"""

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, script
from finetune.config import validate_tool


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from finetune.export import run

    with script():
        run(validate_tool(cfg, required=("ckpt",), positive=("calibration_images",),
                          non_negative=("num_workers", "seed")))


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
