"""finetune against plain PyTorch, side by side: uv run scripts/benchmark.py [device=cpu|cuda] [out=benchmark.json]
The harness is a developer tool, outside the library: benchmarks/speed.py."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, quiet_lightning, script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with script():
        from speed import run

        quiet_lightning()
        run(cfg)


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
