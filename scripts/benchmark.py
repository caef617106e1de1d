"""finetune against plain PyTorch, side by side: uv run scripts/benchmark.py [device=cpu|cuda] [out=benchmark.json]"""

import hydra
from omegaconf import DictConfig

from finetune.cli import expand_home_in_arguments, script


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from finetune.benchmark import run

    with script():
        run(cfg)


if __name__ == "__main__":
    expand_home_in_arguments()
    main()
