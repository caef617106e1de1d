"""The decoded-image cache over time: what a killed build leaves is removed, a changed dataset decodes only its
new and changed files and the cache it supersedes goes (unless a running job uses it), a damaged cache is rebuilt
instead of blaming the images, and concurrent runs build a cache once."""

import logging
import multiprocessing
import os
import pickle
import signal
import time

import numpy as np
import pytest
from PIL import Image
from support.fabricate import make_image_folder

from finetune.data import cache as cache_module
from finetune.data.cache import ImageCache, open_or_build, remove_stale_temporaries, resize_short_side
from finetune.data.images import open_rgb

SIZE, INTERPOLATION = 36, "bilinear"
FORK = multiprocessing.get_context("fork")


def build(paths, directory, name="set", size=SIZE) -> ImageCache:
    return open_or_build(paths, directory, name, size, INTERPOLATION, 10**8)


def jpegs(root, per_class=4):
    root = make_image_folder(root, {"red": "red", "blue": "blue"}, per_class=per_class, size=(60, 45))
    return sorted(str(p) for p in root.rglob("*.jpg"))


def fresh(path, size=SIZE) -> np.ndarray:
    """What decoding the file now gives."""
    return np.asarray(resize_short_side(open_rgb(path, draft=size), size, INTERPOLATION))


def files_of(directory, cache: ImageCache) -> list:
    stem = cache.pixels_path.name.removesuffix(".u8")
    return sorted(p.name for p in directory.glob(f"{stem}.*"))


@pytest.fixture
def decoded(monkeypatch):
    """The paths the cache decodes (instead of copying them from an earlier cache), in order."""
    paths = []
    decode = cache_module._decode

    def counting(args):
        paths.append(args[0])
        return decode(args)

    monkeypatch.setattr(cache_module, "_decode", counting)
    return paths


def test_a_changed_dataset_decodes_only_its_new_and_changed_files_and_the_old_cache_goes(tmp_path, decoded, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    assert decoded == paths
    old = files_of(directory, first)
    assert [name.removeprefix(first.pixels_path.stem) for name in old] == \
        [".files.json", ".index.npy", ".lock", ".u8", ".use"]
    first.close()

    replaced, touched = paths[2], paths[5]
    Image.new("RGB", (50, 70), (200, 10, 10)).save(replaced)  # new bytes, new size and modification time
    os.utime(touched, ns=(10**18, 10**18))  # the same bytes, a new modification time
    added = str(tmp_path / "data" / "red" / "9999.jpg")
    Image.new("RGB", (80, 60), (10, 10, 200)).save(added)
    paths = sorted([*paths, added])
    decoded.clear()
    with caplog.at_level(logging.INFO, logger="finetune.data.cache"):
        second = build(paths, directory)
    assert sorted(decoded) == sorted([replaced, touched, added])  # the other 6 are copied from the old cache
    assert "6 of 9 images are unchanged" in caplog.text
    # the old cache can never be used again: all its files are gone, and the log says how much was freed
    assert not any((directory / name).exists() for name in old)
    assert f"removed {directory / first.pixels_path.stem}" in caplog.text and "MB freed), superseded" in caplog.text
    # every image is what a full build from nothing gives
    full = build(paths, tmp_path / "full")
    assert len(second) == len(full) == len(paths)
    assert second.pixels_path.stat().st_size == full.pixels_path.stat().st_size
    for j, path in enumerate(paths):
        assert np.array_equal(np.asarray(second.image(j)), np.asarray(full.image(j)))
        assert np.array_equal(np.asarray(second.image(j)), fresh(path))


def test_ctrl_c_during_a_build_leaves_nothing_behind(tmp_path, monkeypatch):
    paths = jpegs(tmp_path / "data")
    decode = cache_module._decode

    def interrupted(args):
        if args[0] == paths[3]:
            raise KeyboardInterrupt
        return decode(args)

    monkeypatch.setattr(cache_module, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(paths, tmp_path / "cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]


def test_a_superseded_cache_a_running_job_uses_is_named_and_removed_once_it_is_released(tmp_path, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    os.utime(paths[0], ns=(10**18, 10**18))
    with caplog.at_level(logging.INFO, logger="finetune.data.cache"):
        second = build(paths, directory)
    assert first.pixels_path.is_file() and np.array_equal(np.asarray(first.image(0)), np.asarray(second.image(0)))
    assert f"rm {directory / first.pixels_path.stem}.*" in caplog.text and "a running job is using it" in caplog.text
    # a DataLoader worker's copy does not hold the lock: only the process that opened the cache does
    assert pickle.loads(pickle.dumps(first))._use is None
    first.close()
    build(paths, directory)
    assert not first.pixels_path.exists() and not first.index_path.exists()
    assert second.pixels_path.is_file()


def test_caches_of_another_subset_or_size_stay_and_a_subset_is_copied_not_decoded(tmp_path, decoded):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    whole = build(paths, directory)
    decoded.clear()
    subset = build(paths[::2], directory)  # another dataset.limit_per_class, say
    assert decoded == []
    bigger = build(paths, directory, size=48)
    assert len(decoded) == len(paths)
    for cache in (whole, subset, bigger):
        cache.close()
    build(paths, directory)
    assert all(c.pixels_path.is_file() for c in (whole, subset, bigger))
    for j, path in enumerate(paths[::2]):
        assert np.array_equal(np.asarray(subset.image(j)), fresh(path))


def test_a_cache_whose_images_all_moved_is_reported_not_removed(tmp_path, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    first.close()
    (tmp_path / "data").rename(tmp_path / "moved")  # or a disk that is not mounted today
    with caplog.at_level(logging.WARNING, logger="finetune.data.cache"):
        build([p.replace(str(tmp_path / "data"), str(tmp_path / "moved")) for p in paths], directory)
    assert first.pixels_path.is_file()
    assert "none of its 8 images is where it was" in caplog.text and f"rm {directory / first.pixels_path.stem}.*" \
        in caplog.text


def test_a_dataset_moved_with_its_cache_finds_it_again_and_decodes_nothing(tmp_path, decoded, caplog):
    """Issue 22 item 14: the cache keyed and recorded absolute paths, so a dataset moved with its .finetune-cache
    was decoded again."""
    paths = jpegs(tmp_path / "data")
    first = build(paths, tmp_path / "data" / ".finetune-cache")
    first.close()
    (tmp_path / "data").rename(tmp_path / "moved")
    decoded.clear()
    moved = [p.replace(str(tmp_path / "data"), str(tmp_path / "moved")) for p in paths]
    with caplog.at_level(logging.INFO, logger="finetune.data.cache"):
        again = build(moved, tmp_path / "moved" / ".finetune-cache")
    assert decoded == [] and again.pixels_path.name == first.pixels_path.name and "decoding" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "moved" / ".finetune-cache").glob("*.u8")) == [first.pixels_path.name]
    for j, path in enumerate(moved):
        assert np.array_equal(np.asarray(again.image(j)), fresh(path))


def test_a_cache_of_the_same_images_under_an_earlier_name_is_copied_then_removed(tmp_path, decoded, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "data" / ".finetune-cache"
    first = build(paths, directory)
    first.close()
    old_stem = first.pixels_path.stem.rsplit("-", 1)[0] + "-0123456789abcdef"  # as an earlier version named it
    for path in directory.glob(f"{first.pixels_path.stem}.*"):
        path.rename(directory / (old_stem + path.name.removeprefix(first.pixels_path.stem)))
    decoded.clear()
    with caplog.at_level(logging.INFO, logger="finetune.data.cache"):
        again = build(paths, directory)
    assert decoded == [] and again.pixels_path == first.pixels_path
    assert not list(directory.glob(f"{old_stem}.*")) and "which records their paths as this version does" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty", "index"])
def test_a_damaged_cache_is_rebuilt_instead_of_blaming_the_images(tmp_path, damage, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    size = first.pixels_path.stat().st_size
    first.close()
    if damage == "index":
        first.index_path.write_bytes(first.index_path.read_bytes()[:40])
    else:
        os.truncate(first.pixels_path, size // 2 if damage == "truncated" else 0)
    with caplog.at_level(logging.WARNING, logger="finetune.data.cache"):
        again = build(paths, directory)
    assert "damaged" in caplog.text and first.pixels_path.name in caplog.text and "rebuilding it" in caplog.text
    if damage == "truncated":
        assert f"{size // 2:,} bytes where its index needs {size:,}" in caplog.text
    assert again.pixels_path == first.pixels_path and again.pixels_path.stat().st_size == size
    for j, path in enumerate(paths):
        assert np.array_equal(np.asarray(again.image(j)), fresh(path))


def test_a_cache_cut_short_after_it_was_opened_names_the_cache(tmp_path):
    paths = jpegs(tmp_path / "data")
    cache = build(paths, tmp_path / "cache")
    os.truncate(cache.pixels_path, 10)
    with pytest.raises(OSError, match="image cache .* was cut short after it was opened"):
        cache.image(len(paths) - 1)


def test_a_cache_made_before_caches_recorded_their_files_is_used_and_kept(tmp_path, decoded):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    first.close()
    files = first.pixels_path.with_name(first.pixels_path.stem + ".files.json")
    files.unlink()
    decoded.clear()
    again = build(paths, directory)
    assert decoded == [] and again.pixels_path == first.pixels_path and files.is_file()  # its list written now
    again.close()
    files.unlink()
    os.utime(paths[0], ns=(10**18, 10**18))
    build(paths, directory)
    assert first.pixels_path.is_file()  # without a file list nothing says it is superseded: left alone


def hold_lock(path, held, release):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        held.set()
        release.wait(30)


def test_temporaries_of_a_stopped_build_go_and_those_of_a_running_build_stay(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    dead, running = "set-36px-0123456789abcdef", "set-36px-fedcba9876543210"
    left = [f"{dead}.u8.tmp-99999", f"{dead}.index.tmp-99999.npy", f"{dead}.files.tmp-99999.json",
            f"{dead}.u8", f"{dead}.files.json"]  # pixels renamed into place, killed before the index was written
    building = [f"{running}.u8.tmp-99998", f"{running}.u8"]
    for name in [*left, *building, "notes.tmp-1", "mine.u8"]:  # the last two: not the cache's
        (directory / name).write_bytes(b"x" * 1000)
    (directory / f"{dead}.lock").touch()  # its builder died: nothing holds the lock
    held, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=hold_lock, args=(directory / f"{running}.lock", held, release))
    holder.start()
    try:
        assert held.wait(30)
        paths = jpegs(tmp_path / "data")
        build(paths, directory)
        assert not any((directory / name).exists() for name in left)
        assert all((directory / name).exists() for name in [*building, "notes.tmp-1", "mine.u8"])
    finally:
        release.set()
        holder.join(30)
    remove_stale_temporaries(directory)
    assert not any((directory / name).exists() for name in building)


def build_slowly(paths, directory):
    """A build that decodes one image and then hangs, until it is killed."""
    decode = cache_module._decode

    def slow(args):
        if args[0] != paths[0]:
            time.sleep(60)
        return decode(args)

    cache_module._decode = slow
    build(paths, directory)


def test_a_build_killed_with_sigkill_leaves_nothing_the_next_open_does_not_remove(tmp_path):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    child = FORK.Process(target=build_slowly, args=(paths, directory))
    child.start()
    try:
        for _ in range(300):  # the temporary appears empty and is written a moment later: wait for both
            temporaries = list(directory.glob("*.u8.tmp-*"))
            if temporaries and temporaries[0].stat().st_size > 0:
                break
            time.sleep(0.1)
        assert temporaries and temporaries[0].stat().st_size > 0
        remove_stale_temporaries(directory)  # while the build runs, its temporary stays
        assert temporaries[0].exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert temporaries[0].exists()  # kill -9: nothing of the builder ran
    cache = build(paths, directory)
    assert not list(directory.glob("*.tmp-*")) and len(cache) == len(paths)
    assert np.array_equal(np.asarray(cache.image(1)), fresh(paths[1]))


def build_and_report(paths, directory, start):
    start.wait(30)
    cache = build(paths, directory)
    assert len(cache) == len(paths)


def test_concurrent_runs_build_a_cache_once(tmp_path, monkeypatch):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    log = tmp_path / "decoded.txt"
    decode = cache_module._decode

    def logged(args):
        with open(log, "a") as f:
            f.write(args[0] + "\n")
        return decode(args)

    monkeypatch.setattr(cache_module, "_decode", logged)
    start = FORK.Event()
    runs = [FORK.Process(target=build_and_report, args=(paths, directory, start)) for _ in range(3)]
    for run in runs:
        run.start()
    start.set()
    for run in runs:
        run.join(60)
    assert [run.exitcode for run in runs] == [0, 0, 0]
    assert sorted(log.read_text().split()) == paths  # each image decoded once, by one of them
    assert len(list(directory.glob("*.u8"))) == 1 and not list(directory.glob("*.tmp-*"))
