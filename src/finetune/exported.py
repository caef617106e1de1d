"""An exported ONNX model and its sidecar, run by onnxruntime with numpy and Pillow alone: what predict needs for
model=PATH.onnx, so that it imports neither torch nor Lightning. The images go through the evaluation transform
training used (resize the short side, centre crop), done with Pillow as torchvision does it on PIL images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from finetune.errors import ConfigError, require_extra
from finetune.tasks import task_of


def onnx_session(path: Path, spinning: bool = True):
    """An onnxruntime CPU session of `path`, its own log quiet. Without `spinning`, its threads do not busy-wait
    after each run (they would take the cores from another model timed beside it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedModel:
    """An exported ONNX model run by onnxruntime alone, described by its JSON sidecar (written by export): the input
    size, resize and crop, the class names; normalisation, softmax and temperature are inside the graph."""

    def __init__(self, path: str | Path):
        require_extra("onnx", f"model={path}", ("onnxruntime",))
        path = Path(path).expanduser()
        sidecar = path.with_suffix(".json")
        if path.suffix != ".onnx" or not path.is_file():
            raise ConfigError(f"model={path}: not an ONNX file (export one with scripts/export.py format=onnx)")
        if not sidecar.is_file():
            raise ConfigError(f"model={path}: its sidecar {sidecar.name} is not beside it (export writes both; keep "
                              "them together)")
        try:
            meta = json.loads(sidecar.read_text())
            self.pre = meta["preprocessing"]
            self.task = task_of(meta.get("task"))  # stored by name; an export of an older version: multiclass
            self.classes, self.thresholds, self.softmax_inside = self.task.read_sidecar(meta)
            self.temperature = float(meta.get("temperature", 1.0))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{sidecar}: not an export sidecar with preprocessing and classes ({e!r}); export the "
                              "model again with this version") from None
        self.path = path
        try:
            self.session = onnx_session(path)
        except Exception as e:  # onnxruntime's own errors have no common base class
            raise ConfigError(f"model={path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]}); export it "
                              "again") from None
        self.input = self.session.get_inputs()[0].name

    @property
    def image_size(self) -> int:
        return int(self.pre["crop"])

    @property
    def resize_size(self) -> int:
        """The short side before the centre crop: image_size / crop_pct, as training's evaluation transform."""
        return math.floor(self.image_size / float(self.pre["crop_pct"]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of a uint8 batch (N, 3, H, W)."""
        out = self.session.run(None, {self.input: images})[0]
        if not self.softmax_inside:  # logits: calibrate and normalise here
            z = out / self.temperature
            z = np.exp(z - z.max(1, keepdims=True))
            out = z / z.sum(1, keepdims=True)
        return out

    def prepare(self, image) -> np.ndarray:
        """A PIL image as the model's input, uint8 (3, H, W): torchvision's Resize(short side) and CenterCrop, which on
        PIL images are Pillow's resize and crop with these sizes and offsets."""
        from PIL import Image

        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        size = self.resize_size
        other = int(size * long / short)
        new = (size, other) if width <= height else (other, size)
        if new != (width, height):
            method = Image.BICUBIC if self.pre["interpolation"] == "bicubic" else Image.BILINEAR
            image = image.resize(new, method)
        crop = self.image_size
        left, top = int(round((new[0] - crop) / 2.0)), int(round((new[1] - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    def probabilities_of_images(self, images: list, batch_size: int = 64) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities of RGB PIL images (none fails: they are decoded already)."""
        out = np.empty((len(images), len(self.classes)), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = self(np.stack([self.prepare(image) for image in batch]))
        return out, {}

    def probabilities(self, paths: list[str], batch_size: int = 64, max_pixels: int = 100_000_000,
                      progress: bool = False) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities of the images at `paths` (NaN rows for those that cannot be read) and {position: reason}
        of those; JPEGs decoded at the size the resize needs, as in training."""
        from finetune.data.images import open_rgb
        from finetune.data.integrity import failure_reason

        out = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        starts = range(0, len(paths), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, unit="batch", desc="classifying")
        for start in starts:
            batch, positions = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(self.prepare(open_rgb(paths[i], max_pixels=max_pixels, draft=self.resize_size)))
                    positions.append(i)
                except Exception as e:  # each unreadable file is reported, and the others classified
                    failed[i] = failure_reason(e, paths[i])
            if batch:
                out[positions] = self(np.stack(batch))
        return out, failed
