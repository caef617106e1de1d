"""The decoded-image cache over time: a damaged cache is rebuilt instead of blaming the images."""

import logging
import os

import numpy as np
import pytest
from fabricate import make_image_folder

from finetune.data.cache import ImageCache, open_or_build, resize_short_side
from finetune.data.images import open_rgb

SIZE, INTERPOLATION = 36, "bilinear"


def build(paths, directory, name="set", size=SIZE) -> ImageCache:
    return open_or_build(paths, directory, name, size, INTERPOLATION, 10**8)


def jpegs(root, per_class=4):
    root = make_image_folder(root, {"red": "red", "blue": "blue"}, per_class=per_class, size=(60, 45))
    return sorted(str(p) for p in root.rglob("*.jpg"))


def fresh(path, size=SIZE) -> np.ndarray:
    """What decoding the file now gives."""
    return np.asarray(resize_short_side(open_rgb(path, draft=size), size, INTERPOLATION))


@pytest.mark.parametrize("damage", ["truncated", "empty", "index"])
def test_a_damaged_cache_is_rebuilt_instead_of_blaming_the_images(tmp_path, damage, caplog):
    paths = jpegs(tmp_path / "data")
    directory = tmp_path / "cache"
    first = build(paths, directory)
    size = first.pixels_path.stat().st_size
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
