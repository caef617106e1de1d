"""dataset.download=true against archives the tests build, served from 127.0.0.1: verify, extract, never twice."""

import hashlib
import http.server
import tarfile
import threading
import zipfile

import pytest
from support.fabricate import make_cifar10, make_pet_images, make_stanford_dogs

from finetune.data import download as downloads
from finetune.data.download import Archive
from finetune.data.readers import DataError, read_source


class Server:
    """A static file server on 127.0.0.1 that counts requests and can cut a response short."""

    def __init__(self, folder):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                if server.cut_short:
                    data = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 3])
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.requests: list[str] = []
        self.cut_short = False
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    s = Server(served)
    s.folder = served
    yield s
    s.close()


def sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def md5(path):
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_archive(tmp_path, server, monkeypatch):
    """A cifar-10-python.tar.gz with the real layout, served, and registered as the cifar10 download."""
    built = make_cifar10(tmp_path / "built", per_batch=10)
    archive = server.folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(built / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(downloads.ARCHIVES, "cifar10", [Archive(f"{server.url}/{archive.name}", md5(archive))])
    return archive


def test_download_verifies_extracts_and_is_not_repeated(tmp_path, server, cifar_archive):
    root = tmp_path / "data"
    downloads.download("cifar10", root)
    assert len(read_source("cifar10", str(root))) == 60
    assert downloads.is_downloaded(root, "cifar10")
    assert sorted(p.name for p in root.iterdir()) == [".finetune-download-cifar10.complete", "cifar-10-batches-py"]
    downloads.download("cifar10", root)
    assert server.requests == ["/cifar-10-python.tar.gz"]


def test_wrong_checksum_is_refused_and_nothing_is_left_that_looks_complete(tmp_path, server, cifar_archive,
                                                                             monkeypatch):
    wrong = Archive(f"{server.url}/{cifar_archive.name}", "md5:" + "0" * 32)
    monkeypatch.setitem(downloads.ARCHIVES, "cifar10", [wrong])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="does not match its published checksum .* it was deleted"):
        downloads.download("cifar10", root)
    assert list(root.iterdir()) == []


def test_interrupted_download_is_not_taken_for_a_dataset_and_the_next_run_completes(tmp_path, server,
                                                                                   cifar_archive):
    root = tmp_path / "data"
    server.cut_short = True
    with pytest.raises(DataError, match="could not download"):
        downloads.download("cifar10", root)
    assert list(root.iterdir()) == []
    server.cut_short = False
    downloads.download("cifar10", root)
    assert len(read_source("cifar10", str(root))) == 60


def test_interrupted_extraction_is_redone(tmp_path, server, cifar_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / cifar_archive.name).write_bytes(cifar_archive.read_bytes())  # downloaded and verified, then...
    partial = root / "cifar-10-batches-py"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes(b"half")  # ...killed while the files were being moved into place
    assert downloads.has_partial_download(root, "cifar10")
    downloads.download("cifar10", root)
    assert server.requests == []  # the verified archive was reused
    assert len(read_source("cifar10", str(root))) == 60
    assert not (root / cifar_archive.name).exists()


def test_zip_download_of_pet_images_then_training_data_setup(tmp_path, server, monkeypatch):
    built, bad, _ = make_pet_images(tmp_path / "built", per_class=4)
    archive = server.folder / "kagglecatsanddogs_5340.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((built / "PetImages").rglob("*")):
            z.write(path, path.relative_to(built))
    monkeypatch.setitem(downloads.ARCHIVES, "pet_images", [Archive(f"{server.url}/{archive.name}", sha256(archive))])
    root = tmp_path / "data"
    downloads.download("pet_images", root)
    source = read_source("pet_images", str(root))
    assert source.classes == ["Cat", "Dog"] and len(source) == 8 + len(bad) + 7


def test_two_archives_into_their_folders(tmp_path, server, monkeypatch):
    built, _ = make_stanford_dogs(tmp_path / "built", {"n02085620-Chihuahua": "red", "n02099601-golden_retriever":
                                                       "yellow"}, per_breed=3, lists_dir="lists")
    images, lists = server.folder / "images.tar", server.folder / "lists.tar"
    with tarfile.open(images, "w") as tar:
        tar.add(built / "Images", arcname="Images")
    with tarfile.open(lists, "w") as tar:
        for mat in (built / "lists").iterdir():
            tar.add(mat, arcname=mat.name)  # lists.tar holds the .mat files at its top level
    monkeypatch.setitem(downloads.ARCHIVES, "stanford_dogs", [
        Archive(f"{server.url}/images.tar", sha256(images)),
        Archive(f"{server.url}/lists.tar", sha256(lists), into="lists")])
    root = tmp_path / "data"
    downloads.download("stanford_dogs", root)
    source = read_source("stanford_dogs", str(root))
    assert source.splits.count("test") == 2 and len(source) == 6


def test_datamodule_downloads_only_when_the_data_is_missing(tmp_path, server, cifar_archive):
    from support import FAST, compose

    from finetune.data.datamodule import ImageDataModule
    from finetune.data.transforms import Preprocessing

    pre = Preprocessing(32, 1.0, "bicubic", (0.5,) * 3, (0.25,) * 3)
    present = make_cifar10(tmp_path / "present", per_batch=10)
    for root in (present, tmp_path / "missing"):
        cfg = compose(tmp_path / "run", *FAST, "dataset=cifar10", f"dataset.root={root}", "dataset.download=true")
        data = ImageDataModule(cfg.dataset, cfg.augment, pre, 0, tmp_path / "run")
        data.prepare_data()
        data.setup()
    assert server.requests == ["/cifar-10-python.tar.gz"]  # for the missing one only


def test_kaggle_datasets_print_the_command_to_run(tmp_path):
    with pytest.raises(DataError, match=r"kaggle competitions download -c dogs-vs-cats -p .*unzip -q .*train.zip"):
        downloads.download("dogs_vs_cats", tmp_path)
    with pytest.raises(DataError, match="kaggle competitions download -c dog-breed-identification"):
        downloads.download("dog_breeds", tmp_path)


def test_published_checksums_are_well_formed():
    for archives in downloads.ARCHIVES.values():
        for archive in archives:
            algorithm, digest = archive.checksum.split(":")
            assert len(digest) == {"md5": 32, "sha256": 64}[algorithm] and int(digest, 16) >= 0
            assert archive.url.startswith(("https://", "http://"))
