"""Train, test and record one run (or one per value with -m): uv run scripts/train.py [GROUP=OPTION] [KEY=VALUE]"""

import hydra
from omegaconf import DictConfig

import finetune.config  # noqa: F401  (registers the config schema and resolvers that conf/train.yaml uses)
from finetune.cli import expand_home_in_arguments, one_run_directory_under_torchrun, script


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from finetune.train import run

    with script():
        return run(cfg).get("val/acc_best")


if __name__ == "__main__":
    expand_home_in_arguments()
    one_run_directory_under_torchrun()
    main()
