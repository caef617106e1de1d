"""Metrics, a classification report and figures for a checkpoint: uv run scripts/evaluate.py ckpt=..."""

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, script
from finetune.config import validate_tool


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from finetune.evaluate import run

    with script():
        run(validate_tool(cfg, required=("ckpt",), positive=("batch_size",),
                          non_negative=("num_workers", "top_losses")))


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
