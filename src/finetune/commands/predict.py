"""`finetune predict` and scripts/predict.py: what a checkpoint or an ONNX export says of images."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune.checks import validate_tool
from finetune.cli import expand_home_in_arguments, quiet_lightning, script
from finetune.errors import REFUSED
from finetune.presets import CONF


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="predict")
def main(cfg: DictConfig) -> None:
    with script():
        # checked before the back half (torch) loads: a bad value is one line, in seconds
        cfg = validate_tool(cfg, required=("inputs",), positive=("batch_size", "top_k"),
                            non_negative=("num_workers",))
        from finetune.predict import run

        quiet_lightning()
        result = run(cfg)
    if result["failed"]:
        sys.exit(REFUSED)  # some inputs could not be classified; they are named above


def cli() -> None:
    expand_home_in_arguments()
    main()
