"""Decoding any image file into an upright RGB PIL image, with a pixel limit checked before decoding."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

# 100 megapixels: a 10,000 x 10,000 photo passes; a decompression bomb (a small file that claims gigapixels) does not.
MAX_PIXELS = 100_000_000


class ImageTooLarge(ValueError):
    pass


def open_rgb(path: str, max_pixels: int = MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode `path` as an upright RGB image (EXIF orientation applied; CMYK, grey, palette, alpha, 16-bit handled).

    The header's size is checked against `max_pixels` before any pixel is decoded. With `draft`, a JPEG is
    decoded at the smallest power-of-two reduction whose short side stays >= draft (a 4x smaller decode when
    the training size is a quarter of the photo's).
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels >= 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own refusal must not come before ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides, below
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"over the limit of {max_pixels:,} pixels ({e})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {max_pixels:,}")
    if draft is not None and image.format == "JPEG":
        image.draft("RGB", _draft_size(width, height, draft))
    return to_rgb(image)


def _draft_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = max(short_side / min(width, height), 1e-9)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB, whatever the mode: transparency composited on white, 16-bit scaled, CMYK converted."""
    image = ImageOps.exif_transpose(image)  # also loads the pixels
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
