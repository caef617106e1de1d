"""Exact and near duplicates: one perceptual hash per image, the pairs within a Hamming distance found without
comparing every pair (multi-index hashing), joined into groups that the split keeps on one side.

A near copy (re-encoded at another JPEG quality, resized, cropped by a few pixels) in the validation or test split
of an image in the training split inflates their accuracy; a copy with another label is a labelling mistake. The
hashes are cached next to the data like the integrity scan's results (keyed by path, size and modification time),
so a second run only stats the files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.images import open_rgb
from finetune.data.integrity import cache_path, load_cache, parallel_map, save_cache
from finetune.data.sources import Source

log = logging.getLogger(__name__)

# dataset.dedup: what the check, the split and the README read.
DEDUP = {
    "keep": "report the groups only; the split ignores them",
    "group": "report them, and keep each group on one side of the split",
    "drop": "report them, and keep one image of each group (the others are listed in skipped.csv)",
}
MAX_THRESHOLD = 16  # bits of 64; beyond, unrelated images match and the chunks of the index are too short to help
HASH_CACHE_NAME = ".finetune-hashes.json"
HASH_CACHE_VERSION = 1
HASH_DRAFT = 64  # JPEGs are decoded at a reduced size whose short side is at least this: the hash sees 32x32


def perceptual_hash(image) -> int:
    """imagehash's 64-bit pHash of a PIL image, as an integer."""
    import imagehash

    return int.from_bytes(np.packbits(imagehash.phash(image).hash.ravel()).tobytes(), "big")


def hash_file(path: str, max_pixels: int) -> tuple[int, str]:
    """(perceptual hash, content digest) of an image file, reading it once."""
    data = Path(path).read_bytes()
    image = open_rgb(io.BytesIO(data), max_pixels=max_pixels, draft=HASH_DRAFT)
    return perceptual_hash(image), hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_array(pixels: np.ndarray) -> tuple[int, str]:
    from PIL import Image

    return perceptual_hash(Image.fromarray(pixels)), hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()


def image_hashes(source: Source, root: Path, max_pixels: int, workers: int = 0) -> tuple[np.ndarray, list[str]]:
    """Every sample's perceptual hash (uint64) and content digest: from the pixels in memory, or from its file, with
    the cache for `root` reused and updated."""
    if source.images is not None:
        from tqdm import tqdm

        pairs = [hash_array(a) for a in tqdm(source.images, desc="Hashing images", unit="image",
                                             disable=len(source) < 1000)]
        return np.array([p for p, _ in pairs], dtype=np.uint64), [d for _, d in pairs]
    cache_file = cache_path(root, HASH_CACHE_NAME)
    header = {"version": HASH_CACHE_VERSION, "draft": HASH_DRAFT}
    cached = load_cache(cache_file, header, lambda v: len(v) == 4 and all(isinstance(x, str) for x in v[2:]))
    entries: dict[str, list] = {}
    todo: list[tuple[str, list[int]]] = []
    for path in source.paths:
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns]
        hit = cached.get(path)
        if hit is not None and hit[:2] == key:
            entries[path] = hit
        else:
            todo.append((path, key))
    if todo:
        log.info("Duplicate check: hashing %s images (%d already known)...", f"{len(todo):,}", len(entries))
        results = parallel_map(hash_file, [p for p, _ in todo], workers, max_pixels, progress="Hashing images")
        for (path, key), (phash, digest) in zip(todo, results):
            entries[path] = [*key, f"{phash:016x}", digest]
        save_cache(cache_file, header, {**cached, **entries}, "duplicate-check")
    rows = [entries[p] for p in source.paths]
    return np.array([int(r[2], 16) for r in rows], dtype=np.uint64), [r[3] for r in rows]


def near_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Every pair (i, j), i < j, of `hashes` (uint64) at most `threshold` bits apart, as a (P, 2) array.

    Multi-index hashing: the 64 bits are cut into threshold + 1 chunks; two hashes within `threshold` bits differ in
    at most `threshold` chunks, so by pigeonhole they agree exactly on one. Only hashes that share a chunk value are
    compared, never all n^2 pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = [np.empty((0, 2), dtype=np.int64)]
    edges = np.linspace(0, 64, threshold + 2).round().astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        chunk = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(chunk, kind="stable")
        starts = np.flatnonzero(np.r_[True, chunk[order][1:] != chunk[order][:-1]])
        for bucket in np.split(order, starts[1:]):
            if len(bucket) > 1:
                found.append(_close_within(hashes, np.sort(bucket), threshold))
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def _close_within(hashes: np.ndarray, bucket: np.ndarray, threshold: int) -> np.ndarray:
    """The pairs of `bucket` (sorted indices) within `threshold` bits; all pairs at once when the bucket is small,
    row by row when it is large (memory)."""
    if len(bucket) <= 1024:
        i, j = np.triu_indices(len(bucket), 1)
        close = np.bitwise_count(hashes[bucket[i]] ^ hashes[bucket[j]]) <= threshold
        return np.stack([bucket[i[close]], bucket[j[close]]], axis=1)
    rows = []
    for k in range(len(bucket) - 1):
        rest = bucket[k + 1:]
        close = rest[np.bitwise_count(hashes[bucket[k]] ^ hashes[rest]) <= threshold]
        rows.append(np.stack([np.full(len(close), bucket[k]), close], axis=1))
    return np.concatenate(rows)


@dataclass
class Duplicates:
    """The groups of duplicates of a dataset: images with the same bytes or perceptual hashes at most `threshold`
    bits apart, joined transitively. `groups` lists each group of two or more images (sample indices, the first
    sample first), in the order of their first samples."""

    groups: list[np.ndarray]
    hashes: np.ndarray
    digests: list[str]
    threshold: int

    def group_ids(self) -> np.ndarray:
        """One id per sample, shared by the samples of a group; every other sample has one of its own."""
        ids = np.arange(len(self.hashes))
        for members in self.groups:
            ids[members] = members[0]
        return ids

    def exact(self, members: np.ndarray) -> bool:
        return len({self.digests[j] for j in members}) == 1

    def distance(self, j: int, members: np.ndarray) -> int:
        return int(np.bitwise_count(self.hashes[j] ^ self.hashes[members[0]]))

    def kept(self, official: list[str] | None) -> np.ndarray:
        """dataset.dedup=drop: the samples to keep, one per group. An official val or test image is never dropped, and
        a group that has one keeps none of its training images (each would be a copy of it in train)."""
        keep = np.ones(len(self.hashes), dtype=bool)
        for members in self.groups:
            held_out = [j for j in members if official is not None and official[j] in ("val", "test")]
            keep[members] = False
            keep[held_out if held_out else members[:1]] = True
        return np.flatnonzero(keep)


def find_duplicates(hashes: np.ndarray, digests: list[str], threshold: int) -> Duplicates:
    """Group the samples whose hashes are at most `threshold` bits apart (identical bytes hash alike), transitively."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    unique, inverse = np.unique(hashes, return_inverse=True)  # identical hashes are compared once
    pairs = near_pairs(unique, threshold)
    # a graph of the samples (0..n-1) and the distinct hashes (n..n+u-1): each sample joined to its hash, each hash
    # to the hashes near it
    rows = np.r_[np.arange(n), pairs[:, 0] + n]
    cols = np.r_[inverse.ravel() + n, pairs[:, 1] + n]
    size = n + len(unique)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    component = component[:n]
    order = np.argsort(component, kind="stable")
    starts = np.flatnonzero(np.r_[True, component[order][1:] != component[order][:-1]])
    groups = [members for members in np.split(order, starts[1:]) if len(members) > 1]
    groups.sort(key=lambda members: members[0])
    return Duplicates(groups, hashes, digests, threshold)


def report(duplicates: Duplicates, source: Source, splits: np.ndarray, path: Path) -> dict[str, int]:
    """Write duplicates.csv (a row per image of each group: its group, path, label, split, distance in bits to the
    group's first image, the group's kind and whether its labels conflict) and return the summary's counts.

    `splits` is each sample's split, or 'dropped'. A leak is an image of the official test split in a group that has
    an image in the training or validation split."""
    counts = {"groups": len(duplicates.groups), "exact": 0, "near": 0, "images": 0, "conflicts": 0, "leaks": 0,
              "dropped": int((splits == "dropped").sum())}
    rows = []
    for g, members in enumerate(duplicates.groups, start=1):
        exact = duplicates.exact(members)
        conflict = is_conflict(members, source.labels)
        counts["exact" if exact else "near"] += 1
        counts["images"] += len(members)
        counts["conflicts"] += conflict
        if source.splits is not None and np.isin(splits[members], ("train", "val")).any():
            counts["leaks"] += sum(source.splits[j] == "test" for j in members)
        for j in members:
            rows.append([g, source.paths[j], source.classes[source.labels[j]], splits[j],
                         duplicates.distance(j, members), "exact" if exact else "near", "yes" if conflict else "no"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["group", "path", "label", "split", "distance", "kind", "conflict"])
        writer.writerows(rows)
    return counts


def conflicts(duplicates: Duplicates, source: Source) -> list[str]:
    """'path (label), path (label)' for each group whose images carry different labels."""
    return [", ".join(f"{source.paths[j]} ({source.classes[source.labels[j]]})" for j in members)
            for members in duplicates.groups if is_conflict(members, source.labels)]


def is_conflict(members: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the images of a group carry different labels."""
    return len(set(labels[members].tolist())) > 1
