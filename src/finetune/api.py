"""finetune from Python: compose a training config from the command line's KEY=VALUE overrides, train it, and get
its run back. The same names, configs, checks and results as `finetune train` and scripts/train.py.

    import finetune
    run = finetune.train("dataset=image_folder", "dataset.root=~/data/alpaca", "backbone=mobilenetv2")
    run.dir, run.metrics["test/acc"]
    model = finetune.load(run.dir)          # finetune.model.Model

Front half: torch, Lightning and timm load only when a run starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigError

log = logging.getLogger("finetune")


@dataclass
class Run:
    """A finished training run: its directory (config.yaml, split.csv, checkpoints, metrics.json, model_card.md,
    TensorBoard events, train.log) and its metrics (metrics.json)."""

    dir: Path
    metrics: dict = field(default_factory=dict)


def compose(*overrides: str, config: str = "train") -> DictConfig:
    """The config `config` (train, evaluate, predict, export, benchmark) composed with `overrides` exactly as the
    command line composes it: `compose("dataset=image_folder", "dataset.root=DIR", "schedule.lr=3e-4")`. A group
    option or a key that names nothing, or a value of the wrong type, is one ConfigError line, as on the command
    line. For `train`, `run_dir` is the directory a run started now would write into (outputs/runs/TIME under the
    working folder), unless `run_dir=DIR` is given."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    import finetune.config  # noqa: F401  (the schema and resolvers the configs build on)
    from finetune.cli import command_line_problem
    from finetune.presets import CONF

    overrides = [_home(o) for o in overrides]
    if config == "train":
        problem = command_line_problem(overrides)
        if problem:
            raise ConfigError(problem)
    if GlobalHydra.instance().is_initialized():  # a Hydra app or an earlier compose left it set
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3", job_name=config):
            cfg = hydra_compose(config, overrides=list(overrides), return_hydra_config=config == "train")
    except HydraException as e:
        raise ConfigError(_one_line(e)) from None
    except Exception as e:  # omegaconf's validation errors (a value of the wrong type), and its kin
        if type(e).__module__.startswith(("omegaconf", "hydra")):
            raise ConfigError(_one_line(e)) from None
        raise
    if config == "train":
        with _writable(cfg):
            if not any(o.split("=", 1)[0] == "run_dir" for o in overrides):
                cfg.run_dir = str(Path(OmegaConf.select(cfg, "hydra.run.dir")).absolute())
            cfg.pop("hydra")
    return cfg


def train(*overrides: str | DictConfig) -> Run:
    """Train, test and record one run, as `finetune train OVERRIDES...` does: `overrides` are the command line's
    KEY=VALUE strings, or a config that compose() gave (changed as you like). Returns the Run; its log is also in
    RUN_DIR/train.log. A command that cannot run raises a FinetuneError (its message is the one line the command
    line prints) before any work."""
    if len(overrides) == 1 and isinstance(overrides[0], DictConfig):
        cfg, given = overrides[0], []
    else:
        if any(not isinstance(o, str) for o in overrides):
            raise ConfigError("finetune.training takes KEY=VALUE strings, or one config from finetune.compose")
        given = [_home(o) for o in overrides]
        cfg = compose(*given)
    from finetune.runconfig import plan

    decided = plan(cfg, given)  # the front half: a command that cannot run ends here, before torch loads
    run_dir = Path(decided.cfg.run_dir)
    from finetune.cli import quiet_lightning
    from finetune.training import run_plan

    quiet_lightning()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _logged(run_dir / "train.log"):
        metrics = run_plan(decided, given)
    return Run(run_dir, metrics)


def _home(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}={os.path.expanduser(value)}" if sep and value.startswith("~") else override


def _one_line(e: BaseException) -> str:
    """Hydra's error, and what caused it (a value of the wrong type: omegaconf's words), as one line."""
    said = [next((line.strip() for line in str(x).splitlines() if line.strip()), "") for x in (e, e.__cause__) if x]
    return ": ".join(line for line in said if line) or type(e).__name__


class _writable:
    """The config open for new keys and deletions inside the block (Hydra composes it struct)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)
        return False


class _logged:
    """finetune's log into `path` while the block runs (as Hydra writes RUN_DIR/train.log for the command line), and
    onto the console where nothing else shows it (a notebook)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.logger = logging.getLogger("finetune")
        formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        self.handlers = [logging.FileHandler(self.path)]
        if not logging.getLogger().handlers and not self.logger.handlers:
            self.handlers.append(logging.StreamHandler())
        for handler in self.handlers:
            handler.setFormatter(formatter)
            self.logger.addHandler(handler)
        self.level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.logger.setLevel(self.level)
        return False
