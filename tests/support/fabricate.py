"""Small datasets in the real on-disk layouts: coloured shapes on noisy backgrounds, the class given by the colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 45, 40), "green": (40, 170, 70), "blue": (45, 75, 215),
    "yellow": (225, 205, 40), "purple": (140, 50, 170), "cyan": (40, 200, 210),
    "orange": (225, 95, 40),  # close to red on purpose: hard to tell apart
}


def shape_image(rng: np.random.Generator, colour: tuple[int, int, int],
                size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A filled circle, square or triangle of `colour` (jittered) at a random place on grey noise."""
    w, h = size
    noise = rng.integers(90, 170, size=(h, w, 1)).repeat(3, axis=2).astype(np.uint8)
    return draw_shape(Image.fromarray(noise, "RGB"), rng, colour)


def draw_shape(image: Image.Image, rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """`image` with a filled circle, square or triangle of `colour` (jittered) drawn at a random place."""
    w, h = image.size
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


def scene_image(rng: np.random.Generator, colour: tuple[int, int, int],
                size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A shape as in `shape_image`, on smooth random light and shade instead of noise: images that differ in their
    coarse structure, as photos do, which is what a perceptual hash sees (shapes on noise look alike to it)."""
    coarse = Image.fromarray(rng.integers(40, 216, size=(4, 5, 3)).astype(np.uint8), "RGB")
    return draw_shape(coarse.resize(size, Image.Resampling.BICUBIC), rng, colour)


def make_image_folder(root: Path, classes: dict[str, str], per_class: int | dict[str, int], seed: int = 0,
                      size: tuple[int, int] = (48, 40), ext: str = ".jpg", scenes: bool = False) -> Path:
    """ROOT/<class>/<n>.jpg for each class name -> colour name; per_class may differ by class. `scenes`: shapes on
    smooth backgrounds (`scene_image`) instead of noise."""
    rng = np.random.default_rng(seed)
    draw = scene_image if scenes else shape_image
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class[name] if isinstance(per_class, dict) else per_class):
            draw(rng, COLOURS[colour], size).save(folder / f"{i:04d}{ext}", quality=92)
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


def _jpeg(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90, **kwargs)
    return path


def add_odd_but_valid(folder: Path, colour: str, seed: int = 1) -> list[Path]:
    """Images that are unusual but fine, as real downloads have them: CMYK and grey JPEGs, PNG bytes under a .jpg
    name, RGBA and palette PNGs, a 16-bit PNG, and a JPEG stored sideways with an EXIF orientation."""
    rng = np.random.default_rng(seed)
    rgb = shape_image(rng, COLOURS[colour])
    folder.mkdir(parents=True, exist_ok=True)
    out = [_jpeg(rgb.convert("CMYK"), folder / "odd_cmyk.jpg"), _jpeg(rgb.convert("L"), folder / "odd_grey.jpg")]
    rgb.save(folder / "odd_png_named.jpg", "PNG")
    rgb.convert("RGBA").save(folder / "odd_rgba.png")
    palette = rgb.convert("P")
    palette.save(folder / "odd_palette.png", transparency=0)
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "odd_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _jpeg(rgb.transpose(Image.Transpose.ROTATE_90), folder / "odd_rotated.jpg", exif=exif)
    return out + [folder / n for n in ("odd_png_named.jpg", "odd_rgba.png", "odd_palette.png", "odd_16bit.png",
                                       "odd_rotated.jpg")]


def add_broken(folder: Path, empty_name: str = "empty.jpg") -> dict[Path, str]:
    """Files that cannot be used, with the start of the reason the scan must give for each."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / empty_name).write_bytes(b"")
    whole = folder / "whole.tmp"
    _jpeg(shape_image(np.random.default_rng(5), COLOURS["red"], (64, 64)), whole)
    data = whole.read_bytes()
    whole.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_text("<html>403 Forbidden</html>")
    write_png_header_only(folder / "bomb.png", 50_000, 50_000)
    return {folder / empty_name: "empty file", folder / "truncated.jpg": "truncated",
            folder / "not_an_image.jpg": "not an image", folder / "bomb.png": "too large"}


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_pet_images(root: Path, per_class: int, seed: int = 0) -> tuple[Path, dict[Path, str], list[Path]]:
    """Microsoft's PetImages layout with what the real zip holds: Thumbs.db files, the empty Cat/666.jpg and
    Dog/11702.jpg, a truncated JPEG, a non-image, an oversized image; plus odd but valid images.
    Returns the root, the unusable files with their expected reasons, and the odd-but-valid files."""
    rng = np.random.default_rng(seed)
    pets = root / "PetImages"
    for name, colour in (("Cat", "red"), ("Dog", "blue")):
        for i in range(per_class):
            _jpeg(shape_image(rng, COLOURS[colour]), pets / name / f"{i}.jpg")
        (pets / name / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    bad = add_broken(pets / "Cat", empty_name="666.jpg")
    (pets / "Dog" / "11702.jpg").write_bytes(b"")
    bad[pets / "Dog" / "11702.jpg"] = "empty file"
    odd = add_odd_but_valid(pets / "Dog", "blue")
    return root, bad, odd


def make_dog_breeds(root: Path, breeds: dict[str, str], per_breed: int, missing: int = 1, seed: int = 0) -> Path:
    """Kaggle dog-breed-identification: ROOT/labels.csv (id,breed), ROOT/train/<id>.jpg, ROOT/test/<id>.jpg.
    The last `missing` ids of labels.csv have no image, as happens with a partial unzip."""
    rng = np.random.default_rng(seed)
    rows = []
    for breed, colour in breeds.items():
        for _ in range(per_breed):
            image_id = "".join(rng.choice(list("0123456789abcdef"), 32))
            rows.append((image_id, breed))
            _jpeg(shape_image(rng, COLOURS[colour]), root / "train" / f"{image_id}.jpg")
    for image_id, _ in rows[len(rows) - missing:]:
        (root / "train" / f"{image_id}.jpg").unlink()
    _jpeg(shape_image(rng, COLOURS["green"]), root / "test" / "0123456789abcdef0123456789abcdef.jpg")
    (root / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{b}\n" for i, b in rows))
    return root


def make_stanford_dogs(root: Path, breeds: dict[str, str], per_breed: int, lists_dir: str = "lists",
                       seed: int = 0) -> tuple[Path, set[str]]:
    """Stanford Dogs: ROOT/Images/<wnid>-<breed>/<wnid>_<n>.jpg and the .mat split files of lists.tar, one image in
    three in test_list.mat. Returns the root and the test images' paths relative to Images/."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    train, test = [], []
    for k, (folder, colour) in enumerate(breeds.items()):
        wnid = folder.split("-", 1)[0]
        for i in range(per_breed):
            relative = f"{folder}/{wnid}_{1000 + i}.jpg"
            _jpeg(shape_image(rng, COLOURS[colour]), root / "Images" / relative)
            (test if i % 3 == 0 else train).append((relative, k + 1))
    lists = root / lists_dir
    lists.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_list.mat", train), ("test_list.mat", test), ("file_list.mat", train + test)):
        cells = np.empty((len(rows), 1), dtype=object)
        for j, (relative, _) in enumerate(rows):
            cells[j, 0] = relative
        savemat(lists / name, {"file_list": cells, "annotation_list": cells,
                               "labels": np.array([[float(label)] for _, label in rows])})
    return root, {relative for relative, _ in test}


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path, per_batch: int, seed: int = 0) -> Path:
    """torchvision's cifar-10-batches-py: five training batches and a test batch of `per_batch` 32x32 images
    each, pickled as the real ones are (bytes keys, row-major RGB planes)."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(0, 256, size=(10, 3))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        images = np.stack([np.clip(palette[y] + rng.normal(0, 20, (32, 32, 3)), 0, 255) for y in labels])
        data = images.astype(np.uint8).transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f)
    return root


def make_oxford_pets(root: Path, breeds: dict[str, tuple[int, str]], per_breed: int, seed: int = 0) -> Path:
    """torchvision's OxfordIIITPet layout. `breeds` maps an image-name prefix (Abyssinian, american_bulldog) to
    (species: 1 cat, 2 dog; colour); every third image is in test.txt, the rest in trainval.txt."""
    rng = np.random.default_rng(seed)
    pets = root / "oxford-iiit-pet"
    trainval, test = [], []
    for class_id, (prefix, (species, colour)) in enumerate(breeds.items(), start=1):
        for i in range(1, per_breed + 1):
            _jpeg(shape_image(rng, COLOURS[colour]), pets / "images" / f"{prefix}_{i}.jpg")
            (test if i % 3 == 0 else trainval).append(f"{prefix}_{i} {class_id} {species} {i}")
    (pets / "annotations").mkdir(parents=True, exist_ok=True)
    (pets / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (pets / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    return root


def plant_copy(original: Path, target: Path, kind: str) -> Path:
    """A copy of `original` at `target`, as duplicates arrive in real datasets: `exact` (the same bytes), `quality`
    (re-encoded at JPEG quality 60), `resized` (to 3/4 of its size), `cropped` (2 pixels off the top and left) or
    `probe` (3 pixels off the top and left, resized to 0.8, JPEG quality 55: the second probe's copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "exact":
        target.write_bytes(original.read_bytes())
        return target
    image = Image.open(original).convert("RGB")
    w, h = image.size
    if kind == "resized":
        image = image.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC)
    elif kind == "cropped":
        image = image.crop((2, 2, w, h))
    elif kind == "probe":
        image = image.crop((3, 3, w, h)).resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BICUBIC)
    image.save(target, "JPEG", quality={"quality": 60, "probe": 55}.get(kind, 90))
    return target


def multilabel_image(rng: np.random.Generator, present: list[str], size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Grey noise with one shape of each colour in `present`, each in a quadrant of its own (none hides another)."""
    w, h = size
    noise = rng.integers(90, 170, size=(h, w, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    quadrants = rng.permutation(4)
    for colour, q in zip(present, quadrants):
        tile = image.crop(((q % 2) * w // 2, (q // 2) * h // 2, (q % 2 + 1) * w // 2, (q // 2 + 1) * h // 2))
        image.paste(draw_shape(tile, rng, COLOURS[colour]), ((q % 2) * w // 2, (q // 2) * h // 2))
    return image


def make_multilabel_table(root: Path, count: int, labels: tuple[str, ...] = ("red", "green", "blue"), seed: int = 0,
                          sep: str = " ") -> Path:
    """ROOT/images/<n>.jpg, each holding shapes of some of `labels` (each present with probability 0.4, at least
    one), and ROOT/labels.csv: path,labels with the colours present separated by `sep`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        present = [c for c in labels if rng.random() < 0.4] or [labels[int(rng.integers(len(labels)))]]
        multilabel_image(rng, present).save(root / "images" / f"{i:04d}.jpg", quality=92)
        rows.append(f"images/{i:04d}.jpg,{sep.join(present)}")
    (root / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    return root


def sized_image(rng: np.random.Generator, radius: float, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Grey noise with one red disc of `radius` pixels at a random place."""
    w, h = size
    noise = rng.integers(90, 170, size=(h, w, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLOURS["red"])
    return image


def make_regression_table(root: Path, count: int, seed: int = 0) -> Path:
    """ROOT/images/<n>.jpg, each a red disc of radius 3 to 18 px, and ROOT/sizes.csv: path,radius (the target)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        radius = round(float(rng.uniform(3, 18)), 2)
        sized_image(rng, radius).save(root / "images" / f"{i:04d}.jpg", quality=92)
        rows.append(f"images/{i:04d}.jpg,{radius}")
    (root / "sizes.csv").write_text("path,radius\n" + "\n".join(rows) + "\n")
    return root
