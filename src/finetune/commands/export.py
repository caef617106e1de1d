"""`finetune export` and scripts/export.py: a checkpoint as ONNX or TorchScript, checked for parity."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from finetune.checks import validate_tool
from finetune.cli import expand_home_in_arguments, quiet_lightning, script
from finetune.presets import CONF


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="export")
def main(cfg: DictConfig) -> None:
    with script():
        # checked before the back half (torch) loads: a bad value is one line, in seconds
        cfg = validate_tool(cfg, required=("ckpt",), positive=("calibration_images",),
                            non_negative=("num_workers", "seed"))
        from finetune.export import run

        quiet_lightning()
        run(cfg)


def cli() -> None:
    expand_home_in_arguments()
    main()
