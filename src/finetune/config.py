"""The config schema: every key of a training run, its type and its default, stated once.

Hydra composes conf/train.yaml on top of `TrainConfig`, so an unknown key or a value of the wrong type fails at
composition with the key's full name; finetune.checks then checks what types cannot say (lr > 0, a root that
exists, a backbone timm knows). Light: OmegaConf and Hydra's config store only, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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
    table: Optional[str] = None  # dataset=table: the CSV or Parquet file of paths and labels (relative to root)
    path_column: Optional[str] = None  # dataset=table: the column of image paths; null: found by its name or cells
    label_column: Optional[str] = None  # dataset=table or hf: the column of labels; null: found by name or type
    label_sep: Optional[str] = None  # dataset=table: what separates several labels in a cell (task=multilabel: a space)
    target_column: Optional[str] = None  # dataset=table or hf: a column of numbers to regress (task=regression)
    path: Optional[str] = None  # dataset=hf: a folder saved with save_to_disk, an image folder, or a Hub name
    image_column: Optional[str] = None  # dataset=hf: the column of images; null: the one of Image type
    split_column: Optional[str] = None  # dataset=table: a column of train/val/test; null: `split` if there is one
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
    dedup_threshold: int = 12  # near copies: 64-bit pHashes at most this many bits apart (256-bit: 4.5x); 0: same
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
    loss: Optional[str] = None  # task=regression: mse | huber; null: the task's own (finetune.tasks.TASKS)


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
    # multiclass | multilabel | regression (finetune.tasks.TASKS); null: inferred from the data (several labels in one
    # cell: multilabel; dataset.target_column: regression; else multiclass), and the log says which
    task: Optional[str] = None
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


def defaults(part: type) -> dict:
    """The defaults of a part of the schema (ScheduleConfig, HeadConfig, ...) as plain data: code that reads a config
    given as a dict (a checkpoint's, a test's) fills in what it does not give from here, where each is stated."""
    return OmegaConf.to_container(OmegaConf.structured(part))


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
