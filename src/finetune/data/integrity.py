"""Integrity scan: decode every image file once, and skip and report the ones that cannot be used.

A file is usable when it really decodes to an RGB image (the same code path training uses), not when its header
looks right. Results are cached next to the data, keyed by path, size and modification time, so a second run
over 25,000 files only stats them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from PIL import UnidentifiedImageError

from finetune.data.images import ImageTooLarge, open_rgb

log = logging.getLogger(__name__)

CACHE_NAME = ".finetune-scan.json"
CACHE_VERSION = 1


def check_image(path: str, max_pixels: int, draft: int | None = None) -> str | None:
    """None if `path` decodes to an image; otherwise why it cannot be used, in a few words."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Possibly corrupt EXIF data": the pixels are what counts
            open_rgb(path, max_pixels=max_pixels, draft=draft).close()
        return None
    except Exception as e:  # a decoder bug on a hostile file must not stop the scan either
        return failure_reason(e, path)


def failure_reason(error: Exception, path: str | None = None) -> str:
    """Why an image could not be loaded, in the words skipped.csv and predict use."""
    try:
        if path is not None and os.path.getsize(path) == 0:
            return "empty file"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if isinstance(error, ImageTooLarge):
        return f"too large: {error}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (OSError, SyntaxError, ValueError)):
        return f"truncated: {text}" if "truncated" in text or "broken data stream" in text else f"corrupt: {text}"
    return f"unreadable: {type(error).__name__}: {text}"


@dataclass
class ScanResult:
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    checked: int = 0  # files decoded in this run
    cached: int = 0  # files whose result came from the cache

    @property
    def bad_paths(self) -> set[str]:
        return {path for path, _ in self.bad}


def scan(paths: list[str], root: str | Path, max_pixels: int, workers: int = 0,
         draft: int | None = None) -> ScanResult:
    """Check every file in `paths` (all below `root`), reusing and updating the cache for `root`."""
    cache_file = cache_path(Path(root))
    cached = _load_cache(cache_file, max_pixels)
    result = ScanResult()
    todo: list[tuple[str, tuple[int, int]]] = []
    entries: dict[str, list] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            result.bad.append((path, f"unreadable: {e.strerror}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO named like an image would block the reader for ever
            result.bad.append((path, "not a regular file (a FIFO, device or socket): not opened"))
            continue
        key = (st.st_size, st.st_mtime_ns)
        hit = cached.get(os.path.abspath(path))
        if hit is not None and tuple(hit[:2]) == key:
            result.cached += 1
            entries[path] = hit
            if hit[2] is not None:
                result.bad.append((path, hit[2]))
        else:
            todo.append((path, key))
    if todo:
        log.info("Integrity scan: decoding %s files (%d already known)...", f"{len(todo):,}", result.cached)
        reasons = _check_all([p for p, _ in todo], max_pixels, workers, draft)
        for (path, key), reason in zip(todo, reasons):
            entries[path] = [*key, reason]
            if reason is not None:
                result.bad.append((path, reason))
        result.checked = len(todo)
        _save_cache(cache_file, {**cached, **entries}, max_pixels)
    return result


def _check_all(paths: list[str], max_pixels: int, workers: int, draft: int | None) -> list[str | None]:
    return parallel_map(check_image, paths, workers, max_pixels, draft)


def parallel_map(fn, paths: list[str], workers: int, *args, progress: str | None = None) -> list:
    """[fn(path, *args) for path in paths], in `workers` processes when there are enough paths to pay for them; with
    a progress bar named `progress` when there are many."""
    from tqdm import tqdm

    def bar(results):
        quiet = progress is None or len(paths) < 1000
        return tqdm(results, total=len(paths), desc=progress, unit="image", disable=quiet)

    if workers <= 1 or len(paths) < 64:
        return list(bar(fn(p, *args) for p in paths))
    from finetune.workers import ignore_interrupts, interrupts_held

    # multiprocessing's Pool, not concurrent.futures': on Ctrl-C its terminate() stops the workers at once, where
    # ProcessPoolExecutor's shutdown printed a traceback of its own and then waited, sometimes for ever.
    with interrupts_held():
        pool = get_context("fork").Pool(workers, initializer=ignore_interrupts)
    try:
        return list(bar(pool.imap(partial(_call, fn, args), paths,
                                  chunksize=max(1, min(256, len(paths) // (workers * 8))))))
    except BaseException:  # Ctrl-C: the files not yet begun are dropped instead of checked first
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()


def _call(fn, args: tuple, path: str):
    return fn(path, *args)


def cache_path(root: Path, name: str = CACHE_NAME) -> Path:
    """ROOT/NAME (.finetune-scan.json), or a file in the user's cache when ROOT is not writable (a shared dataset)."""
    if os.access(root, os.W_OK):
        return root / name
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune" / "scans"
    return base / (f"{digest}.json" if name == CACHE_NAME else f"{digest}{name}")


def _load_cache(path: Path, max_pixels: int) -> dict[str, list]:
    return load_cache(path, {"version": CACHE_VERSION, "max_pixels": max_pixels},
                      lambda v: len(v) == 3 and (v[2] is None or isinstance(v[2], str)))


def _save_cache(path: Path, files: dict[str, list], max_pixels: int) -> None:
    save_cache(path, {"version": CACHE_VERSION, "max_pixels": max_pixels}, files, "integrity-scan")


def stored_path(path: str, folder: Path, below: Path | None = None) -> str:
    """How a cache in `folder` records `path`: relative to `folder` when the file lies below `below` (default: the
    folder itself), so that they move together; else absolute."""
    path, base = os.path.abspath(path), os.path.abspath(below if below is not None else folder)
    return os.path.relpath(path, os.path.abspath(folder)) if path.startswith(base + os.sep) else path


def located_path(recorded: str, folder: Path) -> str:
    """The absolute path of a file that a cache in `folder` recorded as `recorded` (stored_path)."""
    return recorded if os.path.isabs(recorded) else os.path.normpath(os.path.join(os.path.abspath(folder), recorded))


def load_cache(path: Path, header: dict, valid: Callable[[list], bool]) -> dict[str, list]:
    """The cached entries ({absolute path: [size, mtime_ns, ...]}), or nothing when the file is missing, unreadable,
    of another header (version, settings), or not what this code writes (any valid-but-wrong JSON): the files are
    then read again. Paths below the cache file's folder are stored relative to it (save_cache), so a dataset moved
    with its caches keeps them."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in header.items()):
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {located_path(k, path.parent): v for k, v in files.items() if isinstance(v, list) and len(v) >= 2
            and all(isinstance(x, int) for x in v[:2]) and valid(v)}


def save_cache(path: Path, header: dict, files: dict[str, list], what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        files = {stored_path(k, path.parent): v for k, v in files.items()}
        tmp.write_text(json.dumps({**header, "files": files}))
        tmp.replace(path)
    except OSError as e:  # a cache that cannot be written costs time, not correctness
        log.warning("Could not write the %s cache %s: %s", what, path, e)
