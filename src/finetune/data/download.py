"""dataset.download=true: fetch, verify and extract the datasets that have a public URL.

Every archive is downloaded to ARCHIVE.part, verified against its published checksum and only then renamed;
it is extracted into a temporary folder inside ROOT whose entries are then moved into place; a marker file
written last says the dataset is complete. An interrupted download or extraction therefore never looks
complete, and a completed one is never fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    url: str
    checksum: str  # "md5:<hex>" or "sha256:<hex>", as the publisher or torchvision/TFDS record it
    into: str = ""  # folder under ROOT to extract into

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


# Checksums: CIFAR-10 and Oxford-IIIT Pet as torchvision records them (md5); Stanford Dogs as TensorFlow
# Datasets records them (sha256); Microsoft's PetImages zip as published alongside it (sha256).
ARCHIVES: dict[str, list[Archive]] = {
    "cifar10": [Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        "md5:c58f30108f718f92721af3b95e74349a")],
    "oxford_pets": [
        Archive("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c", into="oxford-iiit-pet"),
        Archive("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                "md5:95a8c909bbe2e81eed6a22bccdf3f68f", into="oxford-iiit-pet"),
    ],
    "pet_images": [Archive(
        "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
        "sha256:b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9")],
    "stanford_dogs": [
        Archive("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
                "sha256:a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"),
        Archive("http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
                "sha256:34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c", into="lists"),
    ],
}

# Kaggle's datasets need an account and its CLI; this is what to run.
KAGGLE = {
    "dogs_vs_cats": "kaggle competitions download -c dogs-vs-cats -p {root} && unzip -q {root}/dogs-vs-cats.zip "
                    "-d {root} && unzip -q {root}/train.zip -d {root}",
    "dog_breeds": "kaggle competitions download -c dog-breed-identification -p {root} && unzip -q "
                  "{root}/dog-breed-identification.zip -d {root}",
}


def marker(root: Path, name: str) -> Path:
    return root / f".finetune-download-{name}.complete"


def is_downloaded(root: Path, name: str) -> bool:
    return marker(root, name).is_file()


def has_partial_download(root: Path, name: str) -> bool:
    """Whether ROOT holds traces of an unfinished download of `name`: archives, .part files, extraction folders."""
    names = {a.filename for a in ARCHIVES.get(name, [])}
    return any(p.name in names or p.name.endswith(".part") or p.name.startswith(".extracting-")
               for p in root.iterdir()) if root.is_dir() else False


def download(name: str, root: str | Path) -> None:
    """Make ROOT hold dataset `name`, downloading and extracting what is missing; a DataError if it cannot."""
    root = Path(root).expanduser()
    if name in KAGGLE:
        raise DataError(f"dataset={name} is on Kaggle only, behind an account: install the kaggle CLI, put your "
                        f"API token in ~/.kaggle/kaggle.json, then run: {KAGGLE[name].format(root=root)}")
    if name not in ARCHIVES:
        raise DataError(f"dataset={name} has no download; dataset.download=true works for {', '.join(ARCHIVES)}")
    if is_downloaded(root, name):
        log.info("dataset=%s is already downloaded in %s", name, root)
        return
    root.mkdir(parents=True, exist_ok=True)
    for archive in ARCHIVES[name]:
        path = root / archive.filename
        if not (path.is_file() and _matches(path, archive.checksum)):
            fetch(archive.url, path, archive.checksum)
        extract(path, root / archive.into)
    marker(root, name).write_text("complete\n")
    for archive in ARCHIVES[name]:
        (root / archive.filename).unlink(missing_ok=True)
    log.info("dataset=%s downloaded, verified and extracted into %s", name, root)


def fetch(url: str, path: Path, checksum: str) -> None:
    """Download `url` to `path` through path.part, verifying `checksum` before the rename."""
    part = path.with_name(path.name + ".part")
    log.info("Downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, time.monotonic()
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    log.info("  %s: %.0f MB%s", path.name, done / 1e6, f" of {total / 1e6:.0f}" if total else "")
        if total and done != total:
            raise OSError(f"the connection closed after {done:,} of {total:,} bytes")
    except OSError as e:  # URLError and connection resets are OSErrors
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}. Run again to retry, or download "
                        f"it yourself into {path.parent}") from None
    if not _matches(part, checksum):
        actual = _digest(part, checksum.split(":", 1)[0])
        part.unlink()
        raise DataError(f"{url} does not match its published checksum ({checksum}; the download has "
                        f"{actual}); it was deleted. Run again to retry; if it persists, the file has changed")
    part.replace(path)


def extract(archive: Path, into: Path) -> None:
    """Extract `archive` into `into` through a temporary folder beside it, so a partial extraction is never in place."""
    into.mkdir(parents=True, exist_ok=True)
    tmp = into / f".extracting-{archive.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log.info("Extracting %s", archive.name)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
    else:
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(tmp, filter="data")  # refuses members that would land outside tmp
            else:
                t.extractall(tmp)
    for entry in tmp.iterdir():
        target = into / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # left by an earlier, interrupted extraction of this archive
        elif target.exists() or target.is_symlink():
            target.unlink()
        entry.replace(target)
    tmp.rmdir()


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, checksum: str) -> bool:
    algorithm, expected = checksum.split(":", 1)
    return _digest(path, algorithm) == expected.lower()
