"""File locks (flock): held by a process until it closes the descriptor or ends, however it ends (kill -9 too).
Imports nothing of the package: the image cache, the run directory and the MLflow store use them."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def flocked(path: Path, operation: int, create: bool = True) -> int | None:
    """A descriptor of `path` holding flock `operation`; None when LOCK_NB is asked and another process holds it
    (or, without `create`, when there is no such file). If the file is removed while this process waits for it,
    it is opened again: the lock held is always that of the file now at `path`."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, operation)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except (BlockingIOError, FileNotFoundError):
            if not create or operation & fcntl.LOCK_NB:
                os.close(fd)
                return None
        os.close(fd)
