"""`finetune train` and scripts/train.py: train, test and record one run (or one per value with -m).
`--backbones [PATTERN]` lists the timm backbones with pretrained weights that match."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import finetune.config  # noqa: F401  (registers the config schema and resolvers that conf/train.yaml uses)
from finetune.cli import (
    check_the_command_line,
    expand_home_in_arguments,
    one_run_directory_under_torchrun,
    quiet_lightning,
    require_plugins_of_the_command_line,
    script,
)
from finetune.presets import CONF


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from finetune.runconfig import command_line_overrides, plan

    with script():
        overrides = command_line_overrides()
        decided = plan(cfg, overrides)  # the front half: a command that cannot run ends here, in seconds
        from finetune.training import run_plan  # the back half: torch, Lightning, timm

        quiet_lightning()
        from finetune.tasks import objective

        return objective(run_plan(decided, overrides))


def cli() -> None:
    if sys.argv[1:2] == ["--backbones"]:
        from finetune.models.backbone import backbones_table

        print(backbones_table(sys.argv[2] if len(sys.argv) > 2 else "*"))
        sys.exit(0)
    expand_home_in_arguments()
    check_the_command_line()
    require_plugins_of_the_command_line()
    one_run_directory_under_torchrun()
    main()
