"""Exact and near duplicates: perceptual hashes of two sizes per image, the candidate pairs within a Hamming distance of
the coarse one found without comparing every pair (multi-index hashing), confirmed by the fine one, joined into groups
that the split keeps on one side.

A near copy (re-encoded at another JPEG quality, resized, cropped by a few pixels) in the validation or test split
of an image in the training split inflates their accuracy; a copy with another label is a labelling mistake. One
64-bit pHash alone misses crops (a 3-pixel crop, a resize to 0.8 and JPEG quality 55 of a noisy 241x377 image can be
10 bits from its original) and, widened to catch them, groups distinct images with little coarse structure (shapes
on pixel noise). So each image gets four hashes: the 64-bit pHash (DCT of a 32x32 grey thumbnail) and the 256-bit
pHash (DCT of 64x64: finer detail), each of the whole image and of its central 90% (a crop of the border lines up
with the centre of its original). A pair is a candidate when its 64-bit hashes, whole or centre, are at most
`threshold` bits apart, and a near copy when its 256-bit hashes also are at most 4.5 x threshold bits apart (54 of
256 at the default 12; benchmarks/duplicates.py measures both rules). The hashes are cached next to the data like the
integrity scan's results (keyed by path, size and modification time), so a second run only stats the files.
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
from finetune.data.samples import Source

log = logging.getLogger(__name__)

# dataset.dedup: what the check, the split and the README read.
DEDUP = {
    "keep": "report the groups only; the split ignores them",
    "group": "report them, and keep each group on one side of the split",
    "drop": "report them, and keep one image of each group (the others are listed in skipped.csv)",
}
MAX_THRESHOLD = 16  # bits of 64; beyond, unrelated images match and the chunks of the index are too short to help
FINE_RATIO = 4.5  # the 256-bit hashes of a near copy are at most FINE_RATIO x threshold bits apart (54 at 12)
CENTRE = 0.9  # the centre view: this share of the width and height
HASH_CACHE_NAME = ".finetune-hashes.json"
HASH_CACHE_VERSION = 2
HASH_DRAFT = 64  # JPEGs are decoded at a reduced size whose short side is at least this: the fine hash sees 64x64


@dataclass
class Hashes:
    """Each sample's hashes: `coarse` (n, 2) uint64, the 64-bit pHash of the whole image and of its centre; `fine`
    (n, 2, 4) uint64, the 256-bit pHash of both; `digests`, a digest of the bytes (the pixels for in-memory images)."""

    coarse: np.ndarray
    fine: np.ndarray
    digests: list[str]

    def __len__(self) -> int:
        return len(self.coarse)

    def coarse_distance(self, i: int, j: int) -> int:
        """Bits apart of the 64-bit hashes of samples i and j: whole to whole, or one's centre to the other whole."""
        a, b = self.coarse[i], self.coarse[j]
        return int(min(np.bitwise_count(a[0] ^ b[0]), np.bitwise_count(a[1] ^ b[0]), np.bitwise_count(a[0] ^ b[1])))


def _phash_bits(image, size: int) -> np.ndarray:
    """imagehash's pHash of `size` x `size` bits, as size * size / 64 uint64 words."""
    import imagehash

    return np.packbits(imagehash.phash(image, hash_size=size).hash.ravel()).view(">u8").astype(np.uint64)


def _centre(image):
    w, h = image.size
    dx, dy = round(w * (1 - CENTRE) / 2), round(h * (1 - CENTRE) / 2)
    return image.crop((dx, dy, w - dx, h - dy)) if dx and dy else image


def image_signature(image) -> list[str]:
    """The four hashes of a PIL image as hex: 64-bit whole, 64-bit centre, 256-bit whole, 256-bit centre."""
    centre = _centre(image)
    return ["".join(f"{word:016x}" for word in _phash_bits(view, size)) for size in (8, 16) for view in (image, centre)]


def hash_file(path: str, max_pixels: int) -> tuple[list[str], str]:
    """(the four hashes as hex, content digest) of an image file, reading it once."""
    data = Path(path).read_bytes()
    image = open_rgb(io.BytesIO(data), max_pixels=max_pixels, draft=HASH_DRAFT)
    return image_signature(image), hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_array(pixels: np.ndarray) -> tuple[list[str], str]:
    from PIL import Image

    return image_signature(Image.fromarray(pixels)), hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()


def _hashes(signatures: list[list[str]], digests: list[str]) -> Hashes:
    words = np.array([[int(h[k:k + 16], 16) for h in sig for k in range(0, len(h), 16)] for sig in signatures],
                     dtype=np.uint64).reshape(len(signatures), 10)
    return Hashes(words[:, :2].copy(), words[:, 2:].reshape(-1, 2, 4).copy(), digests)


def image_hashes(source: Source, root: Path, max_pixels: int, workers: int = 0) -> Hashes:
    """Every sample's hashes: from the pixels in memory, or from its file, with the cache for `root` reused and
    updated."""
    if source.images is not None:
        from tqdm import tqdm

        pairs = [hash_array(a) for a in tqdm(source.images, desc="Hashing images", unit="image",
                                             disable=len(source) < 1000)]
        return _hashes([s for s, _ in pairs], [d for _, d in pairs])
    cache_file = cache_path(root, HASH_CACHE_NAME)
    header = {"version": HASH_CACHE_VERSION, "draft": HASH_DRAFT, "centre": CENTRE}
    cached = load_cache(cache_file, header, lambda v: len(v) == 4 and isinstance(v[2], list) and len(v[2]) == 4
                        and all(isinstance(x, str) for x in [*v[2], v[3]]))
    entries: dict[str, list] = {}
    todo: list[tuple[str, list[int]]] = []
    for path in source.paths:
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns]
        hit = cached.get(os.path.abspath(path))
        if hit is not None and hit[:2] == key:
            entries[path] = hit
        else:
            todo.append((path, key))
    if todo:
        log.info("Duplicate check: hashing %s images (%d already known)...", f"{len(todo):,}", len(entries))
        results = parallel_map(hash_file, [p for p, _ in todo], workers, max_pixels, progress="Hashing images")
        for (path, key), (signature, digest) in zip(todo, results):
            entries[path] = [*key, signature, digest]
        save_cache(cache_file, header, {**cached, **entries}, "duplicate-check")
    rows = [entries[p] for p in source.paths]
    return _hashes([r[2] for r in rows], [r[3] for r in rows])


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


def confirmed_pairs(hashes: Hashes, threshold: int) -> np.ndarray:
    """The pairs (i, j), i < j, of near copies: 64-bit hashes (whole, or one's centre to the other whole, or both
    centres) at most `threshold` bits apart, and 256-bit hashes (the same views) at most FINE_RATIO x threshold."""
    n = len(hashes)
    views = near_pairs(np.r_[hashes.coarse[:, 0], hashes.coarse[:, 1]], threshold) % max(n, 1)
    views = np.sort(views[views[:, 0] != views[:, 1]], axis=1)
    candidates = np.unique(views, axis=0) if len(views) else views.reshape(0, 2)
    if not len(candidates):
        return candidates
    a, b = hashes.fine[candidates[:, 0]], hashes.fine[candidates[:, 1]]

    def bits(x, y):
        return np.bitwise_count(x ^ y).sum(axis=-1)

    fine = np.minimum.reduce([bits(a[:, 0], b[:, 0]), bits(a[:, 1], b[:, 0]), bits(a[:, 0], b[:, 1]),
                              bits(a[:, 1], b[:, 1])])
    return candidates[fine <= FINE_RATIO * threshold]


@dataclass
class Duplicates:
    """The groups of duplicates of a dataset: images with the same bytes, or near copies (`confirmed_pairs`), joined
    transitively. `groups` lists each group of two or more images (sample indices, the first sample first), in the
    order of their first samples."""

    groups: list[np.ndarray]
    hashes: Hashes
    threshold: int

    def group_ids(self) -> np.ndarray:
        """One id per sample, shared by the samples of a group; every other sample has one of its own."""
        ids = np.arange(len(self.hashes))
        for members in self.groups:
            ids[members] = members[0]
        return ids

    def exact(self, members: np.ndarray) -> bool:
        return len({self.hashes.digests[j] for j in members}) == 1

    def distance(self, j: int, members: np.ndarray) -> int:
        """Bits apart of the 64-bit hashes of sample j and the group's first image (the closer of their views)."""
        return self.hashes.coarse_distance(j, members[0])

    def kept(self, official: list[str] | None) -> np.ndarray:
        """dataset.dedup=drop: the samples to keep, one per group. An official val or test image is never dropped, and
        a group that has one keeps none of its training images (each would be a copy of it in train)."""
        keep = np.ones(len(self.hashes), dtype=bool)
        for members in self.groups:
            held_out = [j for j in members if official is not None and official[j] in ("val", "test")]
            keep[members] = False
            keep[held_out if held_out else members[:1]] = True
        return np.flatnonzero(keep)


def find_duplicates(hashes: Hashes, threshold: int) -> Duplicates:
    """Group the samples with the same hashes (the same bytes among them), and the near copies (`confirmed_pairs`),
    transitively."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    # samples with the same four hashes (same bytes hash alike) are joined through one node, and compared once
    keys = np.c_[hashes.coarse, hashes.fine.reshape(n, 8)]
    unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    pairs = confirmed_pairs(Hashes(hashes.coarse[first], hashes.fine[first], []), threshold)
    # a graph of the samples (0..n-1) and their distinct hashes (n..n+u-1): each sample joined to its hashes, each
    # hash to the hashes of its near copies
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
    return Duplicates(groups, hashes, threshold)


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
        conflict = is_conflict(members, source)
        counts["exact" if exact else "near"] += 1
        counts["images"] += len(members)
        counts["conflicts"] += conflict
        if source.splits is not None and np.isin(splits[members], ("train", "val")).any():
            counts["leaks"] += sum(source.splits[j] == "test" for j in members)
        for j in members:
            rows.append([g, source.paths[j], source.label_text(j), splits[j],
                         duplicates.distance(j, members), "exact" if exact else "near", "yes" if conflict else "no"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["group", "path", "label", "split", "distance", "kind", "conflict"])
        writer.writerows(rows)
    return counts


def conflicts(duplicates: Duplicates, source: Source) -> list[str]:
    """'path (label), path (label)' for each group whose images carry different labels."""
    return [", ".join(f"{source.paths[j]} ({source.label_text(j)})" for j in members)
            for members in duplicates.groups if is_conflict(members, source)]


def is_conflict(members: np.ndarray, source) -> bool:
    """Whether the images of a group carry different labels (for regression: different targets)."""
    return len({source.label_text(j) for j in members}) > 1
