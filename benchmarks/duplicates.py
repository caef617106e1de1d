"""Duplicate detection measured: how many planted near copies are found (recall) and how many distinct images are
grouped (false groups), for finetune's rule and the one-pHash rule it replaced, side by side on the same hashes.

    uv run benchmarks/duplicates.py [photos=DIR] [distinct=4000] [originals=100] [seed=0] [out=DIR]

Fabricated, every run: `originals` images of each kind (a coloured shape on pixel noise at 241x377, and on smooth
light and shade at 241x377), and from each a near copy made each way below; `distinct` distinct images of shapes on
noise at 48x40 and at 96x72 (what a perceptual hash sees least in). With photos=DIR (any folder of JPEGs, e.g. real
photos: nothing is downloaded), its first `originals` images get planted copies too, and all its images are
checked for false groups (real datasets hold real duplicates: inspect the groups it lists before calling them
false). Every image is hashed the way a run hashes it (a JPEG file, decoded at reduced size), through
finetune.data.duplicates. Writes OUT/duplicates.json and OUT/duplicates.md, prints the table.

Rules: `finetune` is the run's rule at the default dataset.dedup_threshold (12): 64-bit pHashes (whole image or its
centre) at most 12 bits apart, confirmed by 256-bit pHashes at most 48 bits apart. `pHash<=8` is the previous
rule: the 64-bit pHashes of the whole images at most 8 bits apart.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

DEFAULTS = {"photos": None, "distinct": "4000", "originals": "100", "seed": "0", "out": "benchmark-duplicates"}
COPIES = {  # name: (what, how)
    "probe": "3-pixel crop of the top left, resized to 0.8, JPEG quality 55",
    "crop2": "2% cut off each side, JPEG quality 90",
    "crop5": "5% cut off each side, JPEG quality 90",
    "crop10_corner": "10% cut off the top and the left, JPEG quality 90",
    "half": "resized to 1/2, JPEG quality 90",
    "q30": "re-encoded at JPEG quality 30",
}


def copy_of(image, kind: str):
    from PIL import Image

    w, h = image.size
    if kind == "probe":
        return image.crop((3, 3, w, h)).resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BICUBIC), 55
    if kind in ("crop2", "crop5"):
        f = 0.02 if kind == "crop2" else 0.05
        return image.crop((round(w * f), round(h * f), w - round(w * f), h - round(h * f))), 90
    if kind == "crop10_corner":
        return image.crop((w // 10, h // 10, w, h)), 90
    if kind == "half":
        return image.resize((w // 2, h // 2), Image.Resampling.BICUBIC), 90
    return image, 30


def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"benchmarks/duplicates.py: unknown argument {arg!r}; keys: {', '.join(opts)}")
        opts[key] = value
    return opts


def hash_folder(paths: list[Path]):
    from finetune.data import duplicates as dups

    results = [dups.hash_file(str(p), 10**9) for p in paths]
    return dups._hashes([s for s, _ in results], [d for _, d in results])


def pairs_of(hashes, rule: str) -> set[tuple[int, int]]:
    from finetune.data import duplicates as dups

    if rule == "finetune":
        from finetune.config import DatasetConfig

        found = dups.confirmed_pairs(hashes, DatasetConfig().dedup_threshold)
    else:
        found = dups.near_pairs(hashes.coarse[:, 0], 8)
    return {(int(i), int(j)) for i, j in found}


def grouped_images(pairs: set[tuple[int, int]]) -> int:
    return len({k for pair in pairs for k in pair})


def main(argv: list[str]) -> None:
    from PIL import Image
    from support.fabricate import COLOURS, scene_image, shape_image

    opts = parse(argv)
    rng = np.random.default_rng(int(opts["seed"]))
    colours = list(COLOURS.values())
    n_orig, n_distinct = int(opts["originals"]), int(opts["distinct"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    rules = ("finetune", "pHash<=8")
    recall: dict[str, dict[str, dict[str, float]]] = {}
    false: dict[str, dict[str, dict[str, int]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kinds = {"noise 241x377": lambda: shape_image(rng, colours[rng.integers(7)], (241, 377)),
                 "scene 241x377": lambda: scene_image(rng, colours[rng.integers(7)], (241, 377))}
        originals = {name: [make() for _ in range(n_orig)] for name, make in kinds.items()}
        if opts["photos"]:
            photos = sorted(p for p in Path(opts["photos"]).expanduser().rglob("*")
                            if p.suffix.lower() in (".jpg", ".jpeg"))
            if not photos:
                raise SystemExit(f"photos={opts['photos']}: no JPEG files below it")
            originals[f"photos ({Path(opts['photos']).name})"] = [Image.open(p).convert("RGB") for p in photos[:n_orig]]
        for name, images in originals.items():
            folder = tmp / name.replace(" ", "_")
            folder.mkdir()
            paths = []
            for i, image in enumerate(images):
                paths.append(folder / f"{i:05d}.jpg")
                image.save(paths[-1], quality=92)
                for kind in COPIES:
                    copy, quality = copy_of(image, kind)
                    paths.append(folder / f"{i:05d}_{kind}.jpg")
                    copy.save(paths[-1], quality=quality)
            hashes = hash_folder(paths)
            per = len(COPIES) + 1
            recall[name] = {}
            for rule in rules:
                found = pairs_of(hashes, rule)
                recall[name][rule] = {kind: sum((i * per, i * per + 1 + k) in found for i in range(len(images)))
                                      / len(images) for k, kind in enumerate(COPIES)}
        distinct_sets = {f"shapes on noise {w}x{h}": (w, h) for w, h in ((48, 40), (96, 72))}
        for name, size in distinct_sets.items():
            folder = tmp / f"distinct_{size[0]}"
            folder.mkdir()
            paths = []
            for i in range(n_distinct):
                paths.append(folder / f"{i:05d}.jpg")
                shape_image(rng, colours[i % 7], size).save(paths[-1], quality=92)
            hashes = hash_folder(paths)
            false[name] = {rule: {"images": n_distinct, "pairs": len(p), "grouped": grouped_images(p)}
                           for rule in rules for p in [pairs_of(hashes, rule)]}
        if opts["photos"]:
            hashes = hash_folder(photos)
            false[f"photos ({Path(opts['photos']).name})"] = {
                rule: {"images": len(photos), "pairs": len(p), "grouped": grouped_images(p)}
                for rule in rules for p in [pairs_of(hashes, rule)]}
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "seconds": time.perf_counter() - started, "options": opts, "copies": COPIES, "recall": recall,
              "false": false}
    (out / "duplicates.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["Recall: share of planted near copies grouped with their original", "",
             "| originals | rule | " + " | ".join(COPIES) + " |", "|---|---|" + "---|" * len(COPIES)]
    for name, by_rule in recall.items():
        for rule in rules:
            lines.append(f"| {name} | {rule} | " + " | ".join(f"{by_rule[rule][k]:.2f}" for k in COPIES) + " |")
    lines += ["", "Groups among images without planted copies: every pair of the fabricated ones is false; a folder of "
              "photos may hold real copies (inspect duplicates of the run before calling them false)", "",
              "| images | rule | pairs | images grouped |", "|---|---|---|---|"]
    for name, by_rule in false.items():
        for rule in rules:
            f = by_rule[rule]
            lines.append(f"| {name} ({f['images']}) | {rule} | {f['pairs']} | {f['grouped']} "
                         f"({f['grouped'] / f['images']:.1%}) |")
    lines += ["", "Copies: " + "; ".join(f"{k}: {v}" for k, v in COPIES.items()) + ".",
              f"{result['seconds']:.0f} s on {result['machine']}."]
    (out / "duplicates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
