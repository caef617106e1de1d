"""A run directory's files, named once, and the one way finetune writes a small file there: whole or not at all."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
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
LOCK = ".finetune.lock"  # held by the run that writes the directory, while it runs


def best(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST


def last(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to: RUN_DIR for RUN_DIR/checkpoints/X.ckpt, else the file's folder."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def free_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free of path-2, path-3, ... (before any suffix)."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


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


def held_message(run_dir: Path, holder: str) -> str:
    return (f"{run_dir} is being written by another run ({holder or 'a run that is starting'}): wait for it to end, "
            f"or give this run another hydra.run.dir")


def holder(run_dir: Path) -> str | None:
    """Who holds RUN_DIR (see `held`) now, as its lock file says it ('' while it starts); None when no run does."""
    import fcntl

    from finetune.locks import flocked

    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    fd = flocked(path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
    if fd is not None:
        os.close(fd)
        return None
    try:
        return path.read_text().strip()
    except FileNotFoundError:  # its run ended just now
        return None


@contextlib.contextmanager
def held(run_dir: Path, command: str = ""):
    """The run directory for this run alone while it runs: an exclusive lock on RUN_DIR/.finetune.lock, which the
    kernel releases when the process ends however it ends (kill -9 too). A second run into the same directory is
    refused by a ConfigError naming the run that holds it, before it writes anything."""
    import fcntl

    from finetune.errors import ConfigError
    from finetune.locks import flocked

    path = Path(run_dir) / LOCK
    fd = flocked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        raise ConfigError(held_message(run_dir, path.read_text().strip() if path.is_file() else ""))
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  + (f": {command}" if command else "") + "\n").encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # releases the lock
