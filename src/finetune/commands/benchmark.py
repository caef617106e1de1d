"""`finetune benchmark` and scripts/benchmark.py: finetune against plain PyTorch, side by side
(finetune.benchmark): `device=cpu|cuda`, `out=benchmark.json`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, quiet_lightning, script
from finetune.presets import CONF


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with script():
        from finetune.benchmark import run

        quiet_lightning()
        run(cfg)


def cli() -> None:
    expand_home_in_arguments()
    main()
