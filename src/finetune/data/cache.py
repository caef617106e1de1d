"""dataset.cache=true: every image decoded once, resized to a fixed short side, into one memory-mapped uint8 file.

Decoding a JPEG costs far more than cropping and flipping it; a cache at a little above the training size does the
expensive part once for every later epoch, run and sweep job (FFCV's idea, without a new file format). The cache
lives next to the data, in DATASET_ROOT/.finetune-cache/ (or dataset.cache_dir), as two files:

    <name>.u8          the pixels of every image, HWC RGB uint8, one after another
    <name>.index.npy   (offset, height, width) per image; height 0 marks a file that could not be decoded

<name> holds a hash of the file list (path, size and modification time of every file) and the size, so a changed
dataset gets a new cache and an unchanged one is found again. The index is written last, so a cache whose index
exists is complete; on opening, the .u8 must be as long as its index says, or the cache is rebuilt. Builders take
a file lock: concurrent runs (the ranks of a DDP run, the jobs of a sweep) build it once and the others wait for
it. Readers map the file: the pages are the operating system's page cache, shared by every DataLoader worker, so
host memory per worker does not grow with the dataset. What a build that was killed left behind (its temporaries)
is removed when a cache in the same folder is next opened.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finetune.data.images import open_rgb

log = logging.getLogger(__name__)

VERSION = 1
STEM = re.compile(r".+-\d+px-[0-9a-f]{16}")  # <dataset name>-<short side>px-<key>
TEMPORARY = re.compile(r"(?P<stem>.+-\d+px-[0-9a-f]{16})\.(u8\.tmp-\d+|index\.tmp-\d+\.npy)")


def cache_key(paths: list[str], short_side: int, interpolation: str) -> str:
    """A hash of what the cache depends on: the files (path, size, modification time) and how they are resized."""
    h = hashlib.sha256(f"v{VERSION}|{short_side}|{interpolation}|{len(paths)}".encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"\n{path}|{st.st_size}|{st.st_mtime_ns}".encode())
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
    """The cached images of one file list at one size; `image(j)` is sample j, resized to the short side."""

    def __init__(self, pixels: Path, index: Path):
        self.pixels_path, self.index_path = pixels, index
        self.index = np.load(index)
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # DataLoader workers map the file themselves: no pixels travel in the pickle
        return {**self.__dict__, "_map": None}

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
    processes) while holding a lock, so that concurrent runs build it once. What builds that were stopped left in
    `directory` is removed on the way."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{short_side}px-{cache_key(paths, short_side, interpolation)}"
    pixels, index = directory / f"{stem}.u8", directory / f"{stem}.index.npy"
    remove_stale_temporaries(directory)
    with open(directory / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if index.is_file():
            damage = _damage(pixels, index, len(paths))
            if damage is None:
                log.info("Image cache: %s (%s images, %.1f MB)", pixels, f"{len(paths):,}",
                         pixels.stat().st_size / 1e6)
                return ImageCache(pixels, index)
            log.warning("Image cache %s is damaged (%s): rebuilding it", pixels, damage)
            index.unlink()
        _build(paths, pixels, index, short_side, interpolation, max_pixels, workers)
    return ImageCache(pixels, index)


def _lock(path: Path, operation: int, create: bool = True) -> int | None:
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


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what builds that were stopped (kill -9, Ctrl-C at the wrong moment, a lost node) left in `directory`:
    temporaries, and pixels whose index was never written, of caches whose lock no builder holds. A build in
    progress holds its lock, so its files stay."""
    left: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        match = TEMPORARY.fullmatch(path.name)
        stem = match["stem"] if match else path.name.removesuffix(".u8")
        if match or (STEM.fullmatch(stem) and stem != path.name and not (directory / f"{stem}.index.npy").exists()):
            left.setdefault(stem, []).append(path)
    for stem, paths in left.items():
        lock = _lock(directory / f"{stem}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
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


def _build(paths: list[str], pixels: Path, index: Path, short_side: int, interpolation: str, max_pixels: int,
           workers: int) -> None:
    start = time.perf_counter()
    log.info("Image cache: decoding %s images once, to a %d px short side, into %s", f"{len(paths):,}",
             short_side, pixels)
    tmp = pixels.with_name(f"{pixels.name}.tmp-{os.getpid()}")
    tmp_index = index.with_name(f"{index.stem}.tmp-{os.getpid()}.npy")
    rows = np.zeros((len(paths), 3), dtype=np.int64)
    offset = 0
    jobs = [(p, short_side, interpolation, max_pixels) for p in paths]
    from finetune.cli import ignore_interrupts

    pool = get_context("fork").Pool(workers, initializer=ignore_interrupts) if workers > 1 else None
    try:
        decoded = pool.imap(_decode, jobs, chunksize=16) if pool else map(_decode, jobs)
        with open(tmp, "wb") as f:
            for j, (height, width, data) in enumerate(decoded):
                rows[j] = (offset, height, width)
                f.write(data)
                offset += len(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(pixels)
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
             len(paths) / max(seconds, 1e-9))
