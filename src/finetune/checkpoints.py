"""Checkpoints written atomically in the checkpoint folder itself: a killed save never damages last.ckpt."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".writing"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into an unnamed file in the target's own folder (O_TMPFILE: it disappears with a killed process),
    fsync, then link it under a hidden name and rename it over the target, which is atomic within one filesystem.
    Where O_TMPFILE is not supported (some network filesystems) a hidden named file takes its place; such files
    left by a killed process are removed by `remove_leftovers` when a run starts. Lightning's own save writes
    through a buffer straight to the target, and a kill during that write truncates the previous checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hidden = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            if not _save_unnamed(checkpoint, folder, hidden):
                with open(hidden, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(hidden, path)
            os.fsync(folder)
        except (OSError, RuntimeError) as e:
            hidden.unlink(missing_ok=True)
            if _interrupted(e):  # Ctrl-C in the middle of torch.save: torch then fails its write ("unexpected pos")
                raise KeyboardInterrupt from None
            raise _save_failed(path, e) from None
        finally:
            os.close(folder)


def _interrupted(error: BaseException) -> bool:
    """Whether `error` was raised while a KeyboardInterrupt was being handled: what a save stopped by Ctrl-C raises
    (the zip writer's own error on the way out), which is no full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def _save_failed(path: Path, error: Exception) -> Exception:
    """What a failed save means for the user: most often a full disk, which torch reports as an 'unexpected pos'."""
    import errno
    import shutil

    from finetune.errors import FinetuneError

    free = shutil.disk_usage(path.parent).free
    if getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or free < 2**20:
        return FinetuneError(f"No space left on the device while saving {path} ({free / 2**20:.0f} MB free there): "
                             f"the checkpoints written before are intact; free some space and continue with "
                             f"resume={path.parent.parent}")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return FinetuneError(f"Could not save {path} ({reason}); the checkpoints written before are intact")


def _save_unnamed(checkpoint: dict[str, Any], folder: int, hidden: Path) -> bool:
    """Save into an O_TMPFILE file in `folder` and link it as `hidden`; False where the filesystem cannot."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=folder)
    except (AttributeError, OSError):
        return False
    with os.fdopen(fd, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
        hidden.unlink(missing_ok=True)
        try:
            # with a dir fd, CPython calls linkat(..., AT_SYMLINK_FOLLOW): the file behind /proc/self/fd gets a name
            os.link(f"/proc/self/fd/{f.fileno()}", hidden, src_dir_fd=folder, dst_dir_fd=None, follow_symlinks=True)
        except OSError:
            return False
    return True


def remove_leftovers(folder: Path) -> None:
    """Delete hidden temporaries that a killed save may have left in `folder`."""
    for leftover in Path(folder).glob(f".*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        log.info("Removed %s, left by an interrupted checkpoint save", leftover)
