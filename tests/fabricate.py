"""Small datasets in the real on-disk layouts: coloured shapes on noisy backgrounds, the class given by the colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 45, 40), "green": (40, 170, 70), "blue": (45, 75, 215),
    "yellow": (225, 205, 40), "purple": (140, 50, 170), "cyan": (40, 200, 210),
}


def shape_image(rng: np.random.Generator, colour: tuple[int, int, int],
                size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A filled circle, square or triangle of `colour` (jittered) at a random place on grey noise."""
    w, h = size
    noise = rng.integers(90, 170, size=(h, w, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_image_folder(root: Path, classes: dict[str, str], per_class: int, seed: int = 0,
                      size: tuple[int, int] = (48, 40), ext: str = ".jpg") -> Path:
    """ROOT/<class>/<n>.jpg for each class name -> colour name."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(rng, COLOURS[colour], size).save(folder / f"{i:04d}{ext}", quality=92)
    return root


def make_dogs_vs_cats(root: Path, per_class: int, unlabeled: int = 5, seed: int = 0) -> Path:
    """Kaggle's layout: ROOT/train/cat.N.jpg, ROOT/train/dog.N.jpg (cats red, dogs blue), ROOT/test1/N.jpg."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test1").mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        shape_image(rng, COLOURS["red"]).save(root / "train" / f"cat.{i}.jpg", quality=92)
        shape_image(rng, COLOURS["blue"]).save(root / "train" / f"dog.{i}.jpg", quality=92)
    for i in range(1, unlabeled + 1):
        shape_image(rng, COLOURS["green"]).save(root / "test1" / f"{i}.jpg")
    return root
