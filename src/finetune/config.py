"""The config schema (every key, its type and default) and the checks that run before any work starts.

Hydra composes conf/train.yaml on top of `TrainConfig`, so an unknown key or a value of the wrong type fails at
composition with the key's full name. `validate` then checks what types cannot say (lr > 0, a root that
exists, a backbone timm knows) and raises `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# conf/: the Hydra configs the scripts compose, read also for presets (schedule=scratch, a resumed run's groups)
CONF = Path(__file__).resolve().parents[2] / "conf"


class FinetuneError(Exception):
    """An error the user can fix; scripts print its message as one line instead of a traceback."""

    exit_code = 2


class ConfigError(FinetuneError):
    """A config value that cannot work."""


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: Optional[str] = MISSING  # the dataset's folder, in the layout it was downloaded in; null if bundled
    image_size: Optional[int] = None  # null: the backbone's own input size (timm's data config)
    crop_pct: Optional[float] = None  # evaluation: resize to image_size / crop_pct, centre-crop; null: timm's
    target: Optional[str] = None  # what to classify, where a dataset offers a choice (oxford_pets: breed | species)
    download: bool = False  # fetch, verify and extract the dataset into root if it is not there
    batch_size: int = 64
    num_workers: int = 4
    val_fraction: float = 0.1  # of all images; of the training images where the dataset has an official test split
    test_fraction: float = 0.1  # ignored where the dataset has an official test split
    split_file: Optional[str] = None  # a split.csv of an earlier run, to train and test on exactly its images
    duplicate_ids: str = "refuse"  # a label file (labels.csv) giving one id two labels: refuse | first (keep the first)
    limit_per_class: Optional[int] = None  # a seeded subset of N images per class (and official split)
    balance: str = "none"  # none | weights (class-weighted loss) | sampler (class-balanced batches)
    max_bad_fraction: float = 0.05  # stop before training if more of the files than this cannot be used
    max_pixels: int = 100_000_000  # larger images are skipped, unread (decompression bombs)
    cache: bool = False  # decode every image once into a memory-mapped file next to the data; train from it
    cache_size: Optional[int] = None  # short side of the cached images; null: image_size / crop_pct (256 for 224)
    cache_dir: Optional[str] = None  # null: DATASET_ROOT/.finetune-cache (~/.cache/finetune if root is read-only)
    decode: str = "cpu"  # cpu: workers decode and augment; device: workers read bytes, the GPU decodes and augments
    dedup: str = "group"  # same or near-copy images: keep (report only) | group (one side of the split) | drop (one)
    dedup_threshold: int = 8  # near copies: perceptual hashes (64 bits) at most this many bits apart; 0: same hash only
    folds: Optional[int] = None  # K: K-fold cross-validation of everything outside the test split; null: off
    fold: int = 0  # which fold is the validation split, 0..K-1 (-m dataset.fold=range(K) runs them all)


@dataclass
class BackboneConfig:
    name: str = MISSING  # any timm model name
    pretrained: bool = True  # ImageNet weights through timm (downloaded once into its cache)
    weights: Optional[str] = None  # a local weights file instead of the download (.pth, .bin, .safetensors)


@dataclass
class HeadConfig:
    name: str = "linear"  # linear | mlp
    pool: str = "avg"  # timm global pooling: avg | max | avgmax | catavgmax
    hidden: int = 256  # mlp only: width of the dense layer
    dropout: float = 0.2
    binary: bool = False  # two classes only: one sigmoid output trained with binary cross-entropy, as in Keras


@dataclass
class PhaseConfig:
    train: Any = "all"  # head | all | N: what trains besides the head (the last N blocks of timm's grouping)
    epochs: Optional[int] = None  # how long; null: until the end of the run (the last phase only)
    lr: Optional[float] = None  # the head's peak learning rate; null: schedule.lr
    backbone_lr_ratio: Optional[float] = None  # the backbone's, as a fraction of lr; null: schedule.backbone_lr_ratio
    patience: Optional[int] = None  # end the phase when val/acc has not improved for this many epochs


@dataclass
class ScheduleConfig:
    name: str = "default"  # the preset (conf/schedule/NAME.yaml) this schedule comes from
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # the head's peak learning rate
    weight_decay: float = 0.01
    norm_bias_decay: bool = False  # true: weight decay on biases and normalisation parameters too
    momentum: float = 0.9  # sgd only
    epochs: int = 10
    warmup_epochs: float = 1.0  # linear warm-up of each group, from its first trainable step
    scheduler: str = "cosine"  # cosine | step | constant (after warm-up)
    decay_over: str = "run"  # run: one decay over the whole run; phase: warm-up and decay anew in every phase
    step_size: int = 3  # step: multiply by gamma every step_size epochs
    gamma: float = 0.1
    phases: Optional[list[PhaseConfig]] = None  # the phases, in order; null: the shorthand below
    freeze_epochs: Optional[int] = 2  # shorthand: epochs with the head alone (backbone frozen, in eval mode)
    unfreeze: Any = "all"  # shorthand: then all of the backbone, or N: its last N blocks
    backbone_lr_ratio: float = 0.1  # backbone lr = backbone_lr_ratio * lr once it trains
    # BatchNorm in the blocks that train: frozen (its ImageNet statistics, inference mode, as Keras' training=False;
    # its scale and shift still learn) | train (batch statistics, running averages updated). A random backbone: train
    bn: str = "frozen"
    layer_decay: float = 1.0  # < 1: each backbone block's lr is layer_decay times the next block's (towards the input)
    restore_best: bool = False  # every phase after the first starts from the best weights so far (best.ckpt)
    ema: Optional[float] = None  # decay of an exponential moving average of the weights (e.g. 0.999); null: off
    label_smoothing: float = 0.0
    cache_features: bool = False  # epochs with the whole backbone frozen train the head on its features, computed once
    cache_views: int = 0  # 0: features of the un-augmented images; K: of K augmented views, one per epoch in turn


@dataclass
class AugmentConfig:
    name: str = "light"
    crop: str = "random_resized"  # random_resized | center
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5  # probability
    rotation: float = 0.0  # degrees, either way
    zoom: float = 0.0  # scale in [1 - zoom, 1 + zoom]
    translate: float = 0.0  # fraction of the image size, either way
    policy: Optional[str] = None  # randaugment | trivialaugment (torchvision's), after crop and flip
    num_ops: int = 2  # randaugment: operations per image
    magnitude: int = 9  # randaugment: strength, 0..30
    mixup: float = 0.0  # MixUp's alpha; 0: off
    cutmix: float = 0.0  # CutMix's alpha; 0: off (with both on, each batch gets one of them)


@dataclass
class LoggerConfig:
    # Which loggers write: finetune.loggers.LOGGERS. Each preset (conf/logger/NAME.yaml) switches its own on, so
    # logger=[tensorboard,mlflow] composes several; logger=none switches every one off.
    tensorboard: bool = False
    csv: bool = False
    mlflow: bool = False
    wandb: bool = False
    experiment: str = "finetune"  # the MLflow experiment and the W&B project that runs are grouped in
    run_name: Optional[str] = None  # null: the run directory's name (SWEEP/JOB for a job of a sweep)
    tracking_uri: Optional[str] = None  # MLflow's store; null: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    offline: Optional[bool] = None  # W&B: null: offline unless this machine is logged in to W&B (`wandb sync` later)
    log_model: bool = False  # also upload checkpoints/best.ckpt to MLflow / W&B (its path is always recorded)


@dataclass
class DashboardsConfig:
    enabled: bool = True
    every_n_epochs: int = 1  # confusion matrix, per-class scores, sample predictions and PR curves
    images: int = 16  # images per grid
    max_classes: int = 30  # per-class views only up to this many classes (evaluate draws them for any number)
    graph: bool = True  # the model graph, traced once at the start


@dataclass
class CallbacksConfig:
    early_stopping_patience: Optional[int] = None  # epochs without a better val/acc before stopping
    progress_bar: bool = True
    dashboards: DashboardsConfig = field(default_factory=DashboardsConfig)
    extra: list[Any] = field(default_factory=list)  # callbacks of your own: [{_target_: my.module.MyCallback}]


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = None  # also write last.ckpt every N optimizer steps, besides every epoch


@dataclass
class TuneConfig:
    lr_find: bool = False  # Lightning's learning-rate finder before training; its suggestion replaces schedule.lr
    min_lr: float = 1e-6  # unless schedule.lr was given on the command line
    max_lr: float = 1.0
    steps: int = 100
    early_stop_threshold: Optional[float] = 4.0  # stop when the loss exceeds this times its best; null: never


@dataclass
class TrainConfig:
    seed: int = 42
    calibrate: bool = True  # fit a temperature on the validation split after training (calibrated probabilities)
    run_dir: str = "${hydra:runtime.output_dir}"  # where this run writes everything
    # null: a fresh run. RUN_DIR of an earlier run: continue it from RUN_DIR/checkpoints/last.ckpt. auto: continue the
    # run this run's own directory holds (a requeued job; hydra.run.dir=DIR again), else start a fresh one there.
    # conf/train.yaml makes it auto in a job that submitit runs.
    resume: Optional[str] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _if_resume_dir(resume: Any, then: Any, otherwise: Any) -> Any:
    """hydra.run.dir: `then` when resume= names a run directory; `otherwise` when it is unset or auto (which runs in a
    directory of its own, and looks there for a run to continue)."""
    return then if resume not in (None, "", "None", "null", "auto") else otherwise


def _run_name(time_format: str) -> str:
    """The name of a run's (or sweep's) folder: the time now, to the microsecond. Under torchrun, `torchrun-ID` after
    its rendezvous id, which every process of the run shares on every node (their clocks do not agree to the
    microsecond) and keeps when torchrun restarts them."""
    from datetime import datetime

    from finetune.cluster import torchrun_run_id

    run_id = torchrun_run_id()
    return f"torchrun-{run_id}" if run_id else datetime.now().strftime(time_format)


def _if_submitit_job(then: Any, otherwise: Any) -> Any:
    """`then` in a job that submitit runs (on SLURM, which may stop and requeue it), `otherwise` elsewhere."""
    from finetune.cluster import in_submitit_job

    return then if in_submitit_job() else otherwise


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
OmegaConf.register_new_resolver("if_resume_dir", _if_resume_dir, replace=True)
OmegaConf.register_new_resolver("if_submitit_job", _if_submitit_job, replace=True)
# cached, as Hydra's `now`: every use in one config (and the jobs of a sweep, which copy its cache) get one name
OmegaConf.register_new_resolver("run_name", _run_name, replace=True, use_cache=True)

HEADS = ("linear", "mlp")
CROPS = ("random_resized", "center")
POLICIES = ("randaugment", "trivialaugment")
BALANCE = ("none", "weights", "sampler")
# Keys of conf/trainer that finetune resolves itself instead of handing them to lightning.Trainer as they are.
OWN_TRAINER_KEYS = ("precision", "compile")


def suggest(word: str, options: list[str], n: int = 3) -> str:
    """' Did you mean a, b?' for the closest options, or '' when none is close."""
    close = difflib.get_close_matches(word, options, n=n, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> DictConfig:
    """Check what the schema's types cannot; return the config with every interpolation resolved."""
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

    from finetune import schedule
    from finetune.data.duplicates import DEDUP, MAX_THRESHOLD
    from finetune.data.sources import DUPLICATE_IDS

    _check_finite(cfg)
    d, s, h, a = cfg.dataset, cfg.schedule, cfg.head, cfg.augment
    _check(d.batch_size > 0, f"dataset.batch_size must be > 0 (got {d.batch_size})")
    _check(d.num_workers >= 0, f"dataset.num_workers must be >= 0 (got {d.num_workers})")
    _check(d.image_size is None or d.image_size >= 8, f"dataset.image_size must be >= 8 (got {d.image_size})")
    _check(d.crop_pct is None or 0 < d.crop_pct <= 1, f"dataset.crop_pct must be in (0, 1] (got {d.crop_pct})")
    for key in ("val_fraction", "test_fraction"):
        _check(0 <= d[key] < 1, f"dataset.{key} must be in [0, 1) (got {d[key]})")
    _check(d.val_fraction + d.test_fraction < 1, "dataset.val_fraction + dataset.test_fraction must be < 1")
    _check(d.balance in BALANCE, f"dataset.balance must be one of {', '.join(BALANCE)} (got {d.balance})")
    _check(0 <= d.max_bad_fraction <= 1, f"dataset.max_bad_fraction must be in [0, 1] (got {d.max_bad_fraction})")
    _check(d.max_pixels > 0, f"dataset.max_pixels must be > 0 (got {d.max_pixels})")
    _check(d.limit_per_class is None or d.limit_per_class >= 1,
           f"dataset.limit_per_class must be >= 1 or null (got {d.limit_per_class})")
    _check(d.split_file is None or Path(d.split_file).is_file(), f"dataset.split_file={d.split_file}: no such file")
    _check(not d.download or d.root is not None, "dataset.download=true needs dataset.root: where to put it")
    _check(d.cache_size is None or d.cache_size >= 8, f"dataset.cache_size must be >= 8 or null (got {d.cache_size})")
    _check(d.decode in ("cpu", "device"), f"dataset.decode must be cpu or device (got {d.decode})")
    _check(d.duplicate_ids in DUPLICATE_IDS,
           f"dataset.duplicate_ids must be one of {', '.join(DUPLICATE_IDS)} (got {d.duplicate_ids})")
    _check(d.dedup in DEDUP, f"dataset.dedup must be one of {', '.join(DEDUP)} (got {d.dedup})")
    _check(0 <= d.dedup_threshold <= MAX_THRESHOLD,
           f"dataset.dedup_threshold must be in 0..{MAX_THRESHOLD} bits (got {d.dedup_threshold})")
    _check(d.folds is None or d.folds >= 2, f"dataset.folds must be >= 2 or null (got {d.folds})")
    _check(d.folds is not None or d.fold == 0, f"dataset.fold={d.fold} needs dataset.folds=K, the number of folds")
    _check(d.folds is None or 0 <= d.fold < d.folds,
           f"dataset.fold must be in 0..{(d.folds or 0) - 1} for dataset.folds={d.folds} (got {d.fold})")
    _check(d.folds is None or d.split_file is None,
           "dataset.folds and dataset.split_file: a split file already fixes the split; choose one")
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else None
    _check(cache_dir is None or not cache_dir.exists() or cache_dir.is_dir(),
           f"dataset.cache_dir={d.cache_dir} is a file, not a folder: give a folder for the decoded-image cache")
    _check(not (d.cache and d.decode == "device"), "dataset.cache=true holds images already decoded, and "
           "dataset.decode=device decodes JPEG files on the GPU: choose one")

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

    _check(h.name in HEADS, f"head.name must be one of {', '.join(HEADS)} (got {h.name})")
    _check(0 <= h.dropout < 1, f"head.dropout must be in [0, 1) (got {h.dropout})")
    _check(h.hidden >= 1, f"head.hidden must be >= 1 (got {h.hidden})")

    _check(a.crop in CROPS, f"augment.crop must be one of {', '.join(CROPS)} (got {a.crop})")
    _check(0 <= a.hflip <= 1, f"augment.hflip is a probability in [0, 1] (got {a.hflip})")
    _check(0 <= a.zoom < 1, f"augment.zoom must be in [0, 1) (got {a.zoom})")
    _check(0 <= a.translate < 1, f"augment.translate must be in [0, 1) (got {a.translate})")
    _check(a.policy is None or a.policy in POLICIES,
           f"augment.policy must be one of {', '.join(POLICIES)} or null (got {a.policy})")
    _check(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup and augment.cutmix are alphas: >= 0, 0 for off")
    _check(0 <= a.magnitude <= 30 and a.num_ops >= 1, "augment.magnitude must be in 0..30 and augment.num_ops >= 1")
    _check(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
           f"augment.crop_scale must be [min, max] within (0, 1] (got {list(a.crop_scale)})")

    b = cfg.callbacks.dashboards
    _check(b.every_n_epochs >= 1 and b.images >= 1 and b.max_classes >= 2,
           "callbacks.dashboards: every_n_epochs and images must be >= 1, max_classes >= 2")

    from finetune import loggers

    loggers.check(cfg.logger)

    _check(cfg.checkpoint.every_n_steps is None or cfg.checkpoint.every_n_steps >= 1,
           f"checkpoint.every_n_steps must be >= 1 or null (got {cfg.checkpoint.every_n_steps})")
    t = cfg.tune
    _check(0 < t.min_lr < t.max_lr, f"tune: 0 < tune.min_lr < tune.max_lr (got {t.min_lr}, {t.max_lr})")
    _check(t.steps >= 20, f"tune.steps must be >= 20: the finder's suggestion skips its first 10 (got {t.steps})")

    _validate_trainer(cfg.trainer)
    _validate_backbone(cfg.backbone)
    return cfg


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number in the config is finite: inf or nan in a rate or a fraction trains a NaN model."""
    import math

    items = node.items() if isinstance(node, DictConfig) else enumerate(node) if OmegaConf.is_list(node) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip(".")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value})")
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            _check_finite(value, name)


def _validate_trainer(trainer: DictConfig) -> None:
    import inspect

    from lightning.pytorch import Trainer

    known = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        _check(key in known or key in OWN_TRAINER_KEYS,
               f"trainer.{key} is not an argument of lightning.Trainer.{suggest(key, known)}")
    for key in ("max_epochs", "min_epochs"):
        _check(key not in trainer, f"trainer.{key}: set the number of epochs with schedule.epochs")
    if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda"):
        import torch

        _check(torch.cuda.is_available(), f"trainer.accelerator={trainer.accelerator}, but this machine has no CUDA "
                                          f"GPU that PyTorch can use: trainer=cpu (or trainer.accelerator=auto)")


def _validate_backbone(backbone: DictConfig) -> None:
    """Any name timm.create_model takes: an architecture, ARCH.TAG (one of its pretrained tags), hf-hub:ORG/NAME or
    local-dir:PATH (a folder holding config.json and weights, as timm saves it)."""
    import re

    import timm

    name = backbone.name
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        _check((folder / "config.json").is_file(), f"backbone.name={name}: expected a folder holding config.json and "
                                                   "its weights (model.safetensors or pytorch_model.bin), as timm's "
                                                   "save_for_hf writes it")
    elif name.startswith("hf-hub:"):
        _check(re.fullmatch(r"hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?", name) is not None,
               f"backbone.name={name}: a Hub model is named hf-hub:ORG/NAME (hf-hub:timm/convnext_tiny.fb_in22k)")
    else:
        arch, _, tag = name.partition(".")
        names = timm.list_models()
        if arch not in names:
            alternatives = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
            hint = f" Closest timm names: {', '.join(alternatives)}." if alternatives else ""
            what = f"backbone.name={name}: {arch}" if tag else f"backbone.name={name}"
            raise ConfigError(f"{what} is not a timm model.{hint}")
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if n.split(".", 1)[0] == arch]
        if tag and tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.3)
            known = ", ".join(close + [t for t in tags if t not in close]) if tags else "none"
            raise ConfigError(f"backbone.name={name}: {arch} has no pretrained tag {tag!r}; its tags: {known}")
        if backbone.weights is None and backbone.pretrained:
            _check(bool(tags), f"timm has no pretrained weights for {name}: set backbone.pretrained=false "
                               "or backbone.weights=/path/to/file")
    if backbone.weights is not None:
        _check(Path(backbone.weights).is_file(), f"backbone.weights={backbone.weights}: no such file")


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
