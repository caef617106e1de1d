"""A run directory's files, named once, and the one way finetune writes a small file there: whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

CONFIG = "config.yaml"  # the resolved config of the run (resume reads it)
METRICS = "metrics.json"  # written last: a run directory with metrics.json holds a finished run
SPLIT = "split.csv"  # every image, its label and its split
SKIPPED = "skipped.csv"  # files left out, and why
DUPLICATES = "duplicates.csv"
MODEL_CARD = "model_card.md"
TRACKERS = "trackers.json"  # the run's MLflow and W&B runs
CHECKPOINTS = "checkpoints"
BEST = "best.ckpt"
LAST = "last.ckpt"


def best(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST


def last(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to: RUN_DIR for RUN_DIR/checkpoints/X.ckpt, else the file's folder."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def write_text(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it, renamed over it: a reader sees the old file or the
    new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON, written as write_text does; a number that is not finite is written as null, never as NaN."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    write_text(path, json.dumps(clean(data), indent=2, allow_nan=False) + "\n")
