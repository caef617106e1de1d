"""The pre-flight check of a run's config: every value a type cannot judge, cheapest first, each by the module that
owns its choices. A command that cannot work ends here as one line naming the key, before any work; only the
backbone's and the trainer's checks load their libraries (timm, Lightning), last, once every other value passed."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> DictConfig:
    """Check what the schema's types cannot; return the config with every interpolation resolved."""
    from finetune import data, loggers, schedule, tasks
    from finetune.data import transforms
    from finetune.models import heads

    missing = sorted(OmegaConf.missing_keys(cfg))
    if "dataset.root" in missing:
        raise ConfigError(f"dataset.root is required for dataset={cfg.dataset.name}: dataset.root=/path/to/data")
    if missing:
        raise ConfigError(f"{missing[0]} must be set ({missing[0]}=...)")
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # a broken interpolation
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {str(e).splitlines()[0]}") from None

    _check_finite(cfg)
    data.check(cfg.dataset)
    transforms.check(cfg.augment)
    s = cfg.schedule
    _check(s.lr > 0, f"schedule.lr must be > 0 (got {s.lr})")
    _check(s.weight_decay >= 0, f"schedule.weight_decay must be >= 0 (got {s.weight_decay})")
    _check(s.epochs >= 1, f"schedule.epochs must be >= 1 (got {s.epochs})")
    _check(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0 (got {s.warmup_epochs})")
    _check(s.backbone_lr_ratio > 0, f"schedule.backbone_lr_ratio must be > 0 (got {s.backbone_lr_ratio})")
    _check(s.step_size >= 1, f"schedule.step_size must be >= 1 (got {s.step_size})")
    _check(0 <= s.label_smoothing < 1, f"schedule.label_smoothing must be in [0, 1) (got {s.label_smoothing})")
    _check(s.cache_views >= 0, f"schedule.cache_views must be >= 0 (got {s.cache_views})")
    _check(not s.cache_features or not (cfg.augment.mixup or cfg.augment.cutmix),
           "schedule.cache_features=true trains the frozen phase on features, which MixUp and CutMix cannot mix: "
           "set augment.mixup=0 and augment.cutmix=0, or schedule.cache_features=false")
    schedule.check(s)
    heads.check(cfg.head)
    from finetune.data.readers import reader_tasks

    tasks.check(cfg, reader_tasks(cfg.dataset.name))

    b = cfg.callbacks.dashboards
    _check(b.every_n_epochs >= 1 and b.images >= 1 and b.max_classes >= 2,
           "callbacks.dashboards: every_n_epochs and images must be >= 1, max_classes >= 2")
    _check(cfg.checkpoint.every_n_steps is None or cfg.checkpoint.every_n_steps >= 1,
           f"checkpoint.every_n_steps must be >= 1 or null (got {cfg.checkpoint.every_n_steps})")
    t = cfg.tune
    _check(0 < t.min_lr < t.max_lr, f"tune: 0 < tune.min_lr < tune.max_lr (got {t.min_lr}, {t.max_lr})")
    _check(t.steps >= 20, f"tune.steps must be >= 20: the finder's suggestion skips its first 10 (got {t.steps})")
    loggers.check(cfg.logger)

    # last, as they load timm and Lightning (which the run needs next anyway)
    from finetune import trainer
    from finetune.models import backbone

    backbone.check(cfg.backbone)
    trainer.check(cfg.trainer)
    return cfg


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number in the config is finite: inf or nan in a rate or a fraction trains a NaN model."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node) if OmegaConf.is_list(node) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip(".")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value})")
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            _check_finite(value, name)


def validate_tool(cfg: DictConfig, required: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = ()) -> DictConfig:
    """The checks of evaluate, predict and export: required keys set, counts whole numbers in range."""
    for key in required:
        _check(not OmegaConf.is_missing(cfg, key) and cfg[key] is not None, f"{key}=... is required")
    for key in positive + non_negative:
        value = cfg[key]
        low = 1 if key in positive else 0
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
               f"{key} must be a whole number >= {low} (got {value!r})")
    return cfg
