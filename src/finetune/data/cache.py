"""dataset.cache=true: every image decoded once, resized to a fixed short side, into one memory-mapped uint8 file.

Decoding a JPEG costs far more than cropping and flipping it; a cache at a little above the training size does the
expensive part once for every later epoch, run and sweep job (FFCV's idea, without a new file format). The cache
lives next to the data, in DATASET_ROOT/.finetune-cache/ (or dataset.cache_dir), as three files:

    <name>.u8          the pixels of every image, HWC RGB uint8, one after another
    <name>.files.json  what was cached: short side, interpolation and (path, size, modification time) per image
    <name>.index.npy   (offset, height, width) per image; height 0 marks a file that could not be decoded

<name> holds a hash of the file list (path, size and modification time of every file) and the size, so a changed
dataset gets a new cache and an unchanged one is found again. Paths below the cache folder's parent (the dataset's
own folder, for the default DATASET_ROOT/.finetune-cache) are recorded relative to the cache folder, so a dataset
moved with its cache (mv keeps modification times) finds it again; others are recorded absolute. The index is
written last, so a cache whose index exists is complete; on opening, the .u8 must be as long as its index says, or
the cache is rebuilt. Builders take a file lock (<name>.lock): concurrent runs (the ranks of a DDP run, the jobs of
a sweep) build it once and the others wait for it. Readers map the file: the pages are the operating system's page
cache, shared by every DataLoader worker, so host memory per worker does not grow with the dataset; the process that
opened it holds a shared lock on <name>.use as long as it uses it.

A changed dataset does not start from nothing: the pixels of every file whose path, size and modification time are
unchanged are copied from an earlier cache of the same dataset, and only new or changed files are decoded. Whenever
a cache is opened, what can never be used again goes: temporaries left by a build that was killed, and caches of
the same dataset whose files have changed or gone since (one in use by a running job is named, with the command to
remove it later; one whose files are all gone, as when the dataset moved or its disk is not mounted, likewise).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finetune.data.images import open_rgb
from finetune.data.integrity import located_path, stored_path
from finetune.locks import flocked

log = logging.getLogger(__name__)

VERSION = 1  # of the pixels and their layout: a change here makes every earlier cache useless
SUFFIXES = (".index.npy", ".u8", ".files.json", ".use", ".lock")  # one cache's files; the index first: complete
STEM = re.compile(r".+-\d+px-[0-9a-f]{16}")  # <dataset name>-<short side>px-<key>
TEMPORARY = re.compile(r"(?P<stem>.+-\d+px-[0-9a-f]{16})\.(u8\.tmp-\d+|index\.tmp-\d+\.npy|files\.tmp-\d+\.json)")

FileState = tuple[str, int, int]  # (path, size, modification time in ns)


def file_states(paths: list[str]) -> list[FileState]:
    """(path, size, modification time) of every file: what a cache of them depends on."""
    states = []
    for path in paths:
        st = os.stat(path)
        states.append((path, st.st_size, st.st_mtime_ns))
    return states


def cache_key(states: list[FileState], short_side: int, interpolation: str, directory: Path) -> str:
    """A hash of what the cache in `directory` depends on: the files (path as recorded, size, modification time) and
    how they are resized."""
    h = hashlib.sha256(f"v{VERSION}|{short_side}|{interpolation}|{len(states)}".encode())
    for path, size, mtime_ns in states:
        h.update(f"\n{stored_path(path, directory, below=directory.parent)}|{size}|{mtime_ns}".encode())
    return h.hexdigest()[:16]


def resize_short_side(image: Image.Image, short_side: int, interpolation: str) -> Image.Image:
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return F.resize(image, short_side, interpolation=mode, antialias=True)


def _decode(args: tuple[str, int, str, int]) -> tuple[int, int, bytes]:
    path, short_side, interpolation, max_pixels = args
    try:
        image = resize_short_side(open_rgb(path, max_pixels=max_pixels, draft=short_side), short_side, interpolation)
    except Exception as e:  # it passed the integrity scan; whatever changed since, training reads the file itself
        log.warning("Could not cache %s (%s): it will be read from its file", path, e)
        return 0, 0, b""
    array = np.asarray(image, dtype=np.uint8)
    return array.shape[0], array.shape[1], array.tobytes()


class ImageCache:
    """The cached images of one file list at one size; `image(j)` is sample j, resized to the short side.

    `use` is a descriptor of the cache's .use file holding a shared lock: while it is open, no other process removes
    the cache as superseded. It stays with this object in the process that opened it (not in DataLoader workers'
    pickles) and is released by `close()` or when the object goes."""

    def __init__(self, pixels: Path, index: Path, use: int | None = None):
        self.pixels_path, self.index_path = pixels, index
        self.index = np.load(index)
        self._map: np.memmap | None = None
        self._use = use

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # DataLoader workers map the file themselves: no pixels travel in the pickle
        return {**self.__dict__, "_map": None, "_use": None}

    def close(self) -> None:
        """Release the cache: other processes may remove it once it is superseded."""
        self._map = None
        if getattr(self, "_use", None) is not None:
            os.close(self._use)
            self._use = None

    def __del__(self) -> None:
        self.close()

    def image(self, j: int) -> Image.Image | None:
        """Sample j as an RGB image, or None when it could not be cached (read it from its file instead)."""
        offset, height, width = (int(v) for v in self.index[j])
        if height == 0:
            return None
        if self._map is None:
            self._map = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        pixels = self._map[offset:offset + height * width * 3]
        if len(pixels) != height * width * 3:
            raise OSError(f"the image cache {self.pixels_path} was cut short after it was opened; the file itself "
                          f"is not at fault (remove the cache and run again to rebuild it)")
        return Image.fromarray(np.array(pixels).reshape(height, width, 3))

    @property
    def nbytes(self) -> int:
        return self.pixels_path.stat().st_size


def default_cache_dir(root: str | None) -> Path:
    """DATASET_ROOT/.finetune-cache when the dataset's folder is writable, else ~/.cache/finetune/images."""
    if root:
        folder = Path(root).expanduser()
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder / ".finetune-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune" / "images"


def open_or_build(paths: list[str], directory: Path, name: str, short_side: int, interpolation: str,
                  max_pixels: int, workers: int = 0) -> ImageCache:
    """The cache of `paths` at `short_side` in `directory`: found, or built now (decoding with `workers`
    processes) while holding a lock, so that concurrent runs build it once. Temporaries of killed builds and
    superseded caches of the same dataset in `directory` are removed on the way."""
    directory.mkdir(parents=True, exist_ok=True)
    states = file_states(paths)
    stem = f"{name}-{short_side}px-{cache_key(states, short_side, interpolation, directory)}"
    pixels, index, files = (directory / f"{stem}{suffix}" for suffix in (".u8", ".index.npy", ".files.json"))
    remove_stale_temporaries(directory)
    lock = flocked(directory / f"{stem}.lock", fcntl.LOCK_EX)  # released when closed, also if this process dies
    try:
        complete = index.is_file()
        damage = _damage(pixels, index, len(paths)) if complete else None
        if damage:
            log.warning("Image cache %s is damaged (%s): rebuilding it", pixels, damage)
            index.unlink()
        if complete and not damage:
            if not files.is_file():  # made before caches recorded their files: the key proves these are its files
                _write_files(files, states, short_side, interpolation)
            log.info("Image cache: %s (%s images, %.1f MB)", pixels, f"{len(paths):,}", pixels.stat().st_size / 1e6)
        else:
            donor = _find_donor(directory, name, stem, short_side, interpolation, states)
            try:
                _build(states, pixels, index, files, short_side, interpolation, max_pixels, workers, donor)
            finally:
                if donor is not None:
                    donor.close()
        cache = ImageCache(pixels, index, flocked(directory / f"{stem}.use", fcntl.LOCK_SH))
    finally:
        os.close(lock)
    remove_superseded(directory, name, stem, states, short_side, interpolation)
    return cache


def _damage(pixels: Path, index: Path, count: int) -> str | None:
    """Why the cache with this index cannot be trusted for `count` images, or None when it is whole."""
    try:
        rows = np.load(index)
    except Exception as e:
        return f"its index {index.name} cannot be read: {e}"
    if rows.ndim != 2 or rows.shape[1:] != (3,) or len(rows) != count:
        return f"its index {index.name} has {len(rows)} rows for {count} images"
    end = int((rows[:, 0] + rows[:, 1] * rows[:, 2] * 3).max(initial=0))
    try:
        size = pixels.stat().st_size
    except FileNotFoundError:
        return f"{pixels.name} is missing"
    if size != end:
        return f"{pixels.name} is {size:,} bytes where its index needs {end:,}"
    return None


def _write_files(files: Path, states: list[FileState], short_side: int, interpolation: str) -> None:
    record = {"version": VERSION, "short_side": short_side, "interpolation": interpolation,
              "files": [[stored_path(path, files.parent, below=files.parent.parent), size, mtime_ns]
                        for path, size, mtime_ns in states]}
    tmp = files.with_name(f"{files.name.removesuffix('.files.json')}.files.tmp-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps(record, separators=(",", ":")))
        tmp.replace(files)
    finally:
        tmp.unlink(missing_ok=True)


def _read_files(files: Path) -> dict | None:
    """A cache's record of its files (absolute paths), or None when it cannot be read (left alone then)."""
    try:
        record = json.loads(files.read_text())
        record["files"] = [(located_path(str(p), files.parent), int(size), int(mtime))
                           for p, size, mtime in record["files"]]
        int(record["short_side"]), str(record["interpolation"]), int(record["version"])
        return record
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _caches_of(directory: Path, name: str) -> list[str]:
    """The stems of the complete caches of dataset `name` in `directory` that record their files, newest first."""
    pattern = re.compile(re.escape(name) + r"-\d+px-[0-9a-f]{16}")
    found = []
    for files in directory.glob("*.files.json"):
        stem = files.name.removesuffix(".files.json")
        try:
            if pattern.fullmatch(stem) and (directory / f"{stem}.index.npy").is_file():
                found.append((files.stat().st_mtime_ns, stem))
        except FileNotFoundError:  # removed just now by another process
            pass
    return [stem for _, stem in sorted(found, reverse=True)]


def _size(directory: Path, stem: str) -> int:
    size = 0
    for suffix in SUFFIXES:
        try:
            size += (directory / f"{stem}{suffix}").stat().st_size
        except FileNotFoundError:
            pass
    return size


def _rm(directory: Path, stem: str) -> str:
    return f"rm {shlex.quote(str(directory / stem))}.*"


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what builds that were stopped (kill -9, Ctrl-C at the wrong moment, a lost node) left in `directory`:
    temporaries, and pixels whose index was never written, of caches whose lock no builder holds. A build in
    progress holds its lock, so its files stay."""
    left: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        match = TEMPORARY.fullmatch(path.name)
        stem = match["stem"] if match else path.name.removesuffix(".u8").removesuffix(".files.json")
        if match or (STEM.fullmatch(stem) and stem != path.name and not (directory / f"{stem}.index.npy").exists()):
            left.setdefault(stem, []).append(path)
    for stem, paths in left.items():
        lock = flocked(directory / f"{stem}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
        if lock is None and (directory / f"{stem}.lock").exists():
            continue  # being built now
        try:
            for path in paths:
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                log.info("Image cache: removed %s (%.1f MB), left by a build that was stopped", path, size / 1e6)
        finally:
            if lock is not None:
                os.close(lock)


def remove_superseded(directory: Path, name: str, current: str, states: list[FileState], short_side: int,
                      interpolation: str) -> None:
    """Remove the caches of dataset `name` in `directory` (any size) that can never be used again: some of their
    files have changed or gone since they were built, or they hold the very images of `current` under the name an
    earlier version gave them. One that a running job uses stays and is named, with the command to remove it later;
    so is one whose files are all gone (the dataset moved, or its disk is not mounted). A cache whose files are all as
    they were (another subset, another size) is left alone."""
    known = {os.path.abspath(path): (size, mtime_ns) for path, size, mtime_ns in states}
    for stem in _caches_of(directory, name):
        if stem == current:
            continue
        record = _read_files(directory / f"{stem}.files.json")
        if record is None or not record["files"]:
            continue
        changed, gone, example = _compare(record["files"], known)
        if changed or gone:
            why = f"{changed + gone:,} of its images changed or gone since (e.g. {example})"
        elif (record["short_side"], record["interpolation"], len(record["files"])) == \
                (short_side, interpolation, len(states)) and {p for p, _, _ in record["files"]} == set(known):
            why = f"it holds the same images as {current}, which records their paths as this version does"
        else:
            continue
        size = _size(directory, stem)
        if not changed and gone == len(record["files"]):
            log.warning("Image cache %s (%.1f MB): none of its %s images is where it was (e.g. %s): the dataset "
                        "moved or its disk is not mounted. If it is gone for good, free the space: %s",
                        directory / stem, size / 1e6, f"{gone:,}", example, _rm(directory, stem))
        elif (freed := _remove(directory, stem)) is not None:
            log.info("Image cache: removed %s (%.1f MB freed), superseded: %s", directory / stem, freed / 1e6, why)
        elif (directory / f"{stem}.index.npy").exists():  # else another process has just removed it
            log.warning("Image cache %s (%.1f MB) is superseded (%s) but a running job is using it; the first run "
                        "after it ends removes it, or then: %s", directory / stem, size / 1e6, why,
                        _rm(directory, stem))


def _compare(recorded: list[FileState], known: dict[str, tuple[int, int]]) -> tuple[int, int, str]:
    """How many of `recorded` have changed and how many are gone, and one of them; `known` are states already
    taken (this run's files), the others are looked up."""
    changed = gone = 0
    example = ""
    for path, size, mtime_ns in recorded:
        state = known.get(path)
        if state is None:
            try:
                st = os.stat(path)
                state = (st.st_size, st.st_mtime_ns)
            except (FileNotFoundError, NotADirectoryError):
                gone += 1
                example = example or path
                continue
            except OSError:  # cannot tell (no permission, a network share failing): as if unchanged
                continue
        if state != (size, mtime_ns):
            changed += 1
            example = example or path
    return changed, gone, example


def _remove(directory: Path, stem: str) -> int | None:
    """Remove cache `stem` unless a process builds or uses it; the bytes freed, or None when it is in use."""
    lock = flocked(directory / f"{stem}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
    if lock is None:
        return None
    try:
        use = flocked(directory / f"{stem}.use", fcntl.LOCK_EX | fcntl.LOCK_NB)
        if use is None:
            return None
        freed = 0
        try:
            for suffix in SUFFIXES:  # the index first: from then on it is not a complete cache
                path = directory / f"{stem}{suffix}"
                try:
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            os.close(use)
        return freed
    finally:
        os.close(lock)


@dataclass
class _Donor:
    """An earlier cache of the same dataset, size and interpolation, held (shared lock) while pixels are copied."""

    pixels: Path
    rows: dict[str, tuple[int, int, int, int, int]]  # absolute path -> (size, mtime_ns, offset, height, width)
    use: int

    def __post_init__(self):
        self.map = np.memmap(self.pixels, dtype=np.uint8, mode="r") if self.pixels.stat().st_size else None

    def take(self, state: FileState) -> tuple[int, int, np.ndarray] | None:
        """The cached pixels of a file in `state`, or None when they are not here (a new or changed file)."""
        path, size, mtime_ns = state
        row = self.rows.get(os.path.abspath(path))
        if row is None or row[:2] != (size, mtime_ns) or row[3] == 0 or self.map is None:
            return None
        offset, height, width = row[2:]
        return height, width, self.map[offset:offset + height * width * 3]

    def close(self) -> None:
        self.map = None
        os.close(self.use)


def _find_donor(directory: Path, name: str, current: str, short_side: int, interpolation: str,
                states: list[FileState]) -> _Donor | None:
    """The earlier cache that holds the most of `states` unchanged (the newest of equals), locked for reading."""
    known = {os.path.abspath(path): (size, mtime_ns) for path, size, mtime_ns in states}
    candidates = []
    for stem in _caches_of(directory, name):
        record = _read_files(directory / f"{stem}.files.json") if stem != current else None
        if record is None or (record["version"], record["short_side"], record["interpolation"]) != \
                (VERSION, short_side, interpolation):
            continue
        same = sum(known.get(path) == (size, mtime_ns) for path, size, mtime_ns in record["files"])
        if same:
            candidates.append((same, stem, record))
    for _, stem, record in sorted(candidates, key=lambda c: c[0], reverse=True):  # stable: newest first of equals
        lock = flocked(directory / f"{stem}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
        if lock is None:
            continue  # being built, or removed just now
        try:
            pixels, index = directory / f"{stem}.u8", directory / f"{stem}.index.npy"
            if not index.is_file() or _damage(pixels, index, len(record["files"])):
                continue
            use = flocked(directory / f"{stem}.use", fcntl.LOCK_SH)
            try:
                rows = {path: (size, mtime_ns, *(int(v) for v in row))
                        for (path, size, mtime_ns), row in zip(record["files"], np.load(index), strict=True)}
                return _Donor(pixels, rows, use)
            except (OSError, ValueError) as e:  # changed under us: decode instead
                log.warning("Image cache: could not copy from %s (%s); its images are decoded instead", pixels, e)
                os.close(use)
        finally:
            os.close(lock)
    return None


def _build(states: list[FileState], pixels: Path, index: Path, files: Path, short_side: int, interpolation: str,
           max_pixels: int, workers: int, donor: _Donor | None = None) -> None:
    start = time.perf_counter()
    copied = [donor.take(state) for state in states] if donor is not None else [None] * len(states)
    todo = [state[0] for state, pixels_of in zip(states, copied, strict=True) if pixels_of is None]
    if donor is not None:
        log.info("Image cache: %s of %s images are unchanged since %s and copied from it; decoding the other %s "
                 "once, to a %d px short side, into %s", f"{len(states) - len(todo):,}", f"{len(states):,}",
                 donor.pixels, f"{len(todo):,}", short_side, pixels)
    else:
        log.info("Image cache: decoding %s images once, to a %d px short side, into %s", f"{len(states):,}",
                 short_side, pixels)
    tmp = pixels.with_name(f"{pixels.name}.tmp-{os.getpid()}")
    tmp_index = index.with_name(f"{index.stem}.tmp-{os.getpid()}.npy")
    rows = np.zeros((len(states), 3), dtype=np.int64)
    offset = 0
    jobs = [(p, short_side, interpolation, max_pixels) for p in todo]
    from finetune.workers import ignore_interrupts, interrupts_held

    with interrupts_held():  # a Ctrl-C while the workers start is the parent's, after
        pool = get_context("fork").Pool(workers, initializer=ignore_interrupts) if workers > 1 and jobs else None
    try:
        decoded = pool.imap(_decode, jobs, chunksize=16) if pool else map(_decode, jobs)
        with open(tmp, "wb") as f:
            for j, pixels_of in enumerate(copied):
                height, width, data = pixels_of if pixels_of is not None else next(decoded)
                rows[j] = (offset, height, width)
                f.write(data)
                offset += len(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(pixels)
        _write_files(files, states, short_side, interpolation)
        np.save(tmp_index, rows)
        tmp_index.replace(index)  # last: a cache whose index exists is complete
    except BaseException:
        if pool is not None:  # Ctrl-C or an error: stop the workers now, not after the rest of the queue
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        tmp.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log.info("Image cache: %.1f MB written in %.1f s (%.0f images/s)", offset / 1e6, seconds,
             len(states) / max(seconds, 1e-9))
