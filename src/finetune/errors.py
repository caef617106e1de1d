"""Every failure a user can fix: one line, and the exit status the scripts end with. Imports nothing of the package,
so that any module, light or heavy, can raise them."""

from __future__ import annotations

import difflib
import importlib.util

# The exit statuses besides 0: a refusal or a failure the user can fix (2); stopped by Ctrl-C (130) or by SIGTERM
# (143), as for a process those signals end, so that a cluster's scheduler and a shell read them as such.
REFUSED, INTERRUPTED, PREEMPTED = 2, 130, 143


class FinetuneError(Exception):
    """An error the user can fix; scripts print its message as one line instead of a traceback."""

    exit_code = REFUSED


class ConfigError(FinetuneError):
    """A config value that cannot work."""


class DataError(FinetuneError):
    """A dataset that cannot be read as configured."""


class WeightsUnavailable(FinetuneError):
    """Pretrained weights were asked for and cannot be had."""


class UnsafeCheckpoint(FinetuneError):
    """A checkpoint that holds more than tensors and plain containers."""


class NonFiniteLoss(FinetuneError):
    """The training loss turned NaN or infinite; training stopped before a broken model was checkpointed."""


class Preempted(FinetuneError):
    """The run was stopped by SIGTERM after saving a checkpoint."""

    exit_code = PREEMPTED


class Interrupted(FinetuneError):
    """Ctrl-C during training: Lightning stops it; the checkpoints written so far stay."""

    exit_code = INTERRUPTED


class NotRequeued(FinetuneError):
    """submitit's signal stopped the run, and submitit did not requeue it (it timed out too many times)."""


def suggest(word: str, options: list[str], n: int = 3) -> str:
    """' Did you mean a, b?' for the closest options, or '' when none is close."""
    close = difflib.get_close_matches(word, options, n=n, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


class MissingExtra(FinetuneError):
    """An integration asked for whose optional extra is not installed."""


def require_extra(extra: str, what: str, modules: tuple[str, ...]) -> None:
    """MissingExtra, naming the install command, when `what` (a key=value the user gave) needs the optional extra
    `extra` (pyproject.toml) and one of its `modules` is not installed. Looks the modules up without importing them."""
    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a half-installed one
            return False

    missing = [m for m in modules if not present(m)]
    if missing:
        raise MissingExtra(f"{what} needs the optional extra {extra!r} ({', '.join(missing)} is not installed): "
                           f"uv sync --extra {extra} (or pip install 'finetune[{extra}]')")
