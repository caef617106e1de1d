"""Metrics, a classification report and figures for a checkpoint: uv run scripts/evaluate.py ckpt=..."""

import hydra
from omegaconf import DictConfig

from finetune.checks import validate_tool
from finetune.cli import expand_home_in_arguments, quiet_lightning, script


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with script():
        # checked before the back half (torch) loads: a bad value is one line, in seconds
        cfg = validate_tool(cfg, required=("ckpt",), positive=("batch_size",),
                            non_negative=("num_workers", "top_losses"))
        from finetune.evaluate import run

        quiet_lightning()
        run(cfg)


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
