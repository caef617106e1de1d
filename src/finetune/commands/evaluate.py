"""`finetune evaluate` and scripts/evaluate.py: metrics, a classification report and figures for a checkpoint."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from finetune.checks import validate_tool
from finetune.cli import expand_home_in_arguments, quiet_lightning, script
from finetune.presets import CONF


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with script():
        # checked before the back half (torch) loads: a bad value is one line, in seconds
        cfg = validate_tool(cfg, required=("ckpt",), positive=("batch_size",),
                            non_negative=("num_workers", "top_losses"))
        from finetune.evaluate import run

        quiet_lightning()
        run(cfg)


def cli() -> None:
    expand_home_in_arguments()
    main()
