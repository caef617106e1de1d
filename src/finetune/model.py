"""finetune.load(path): one Model over a checkpoint, a run directory or an exported .onnx model, with the classes,
the task and `predict` of any of them, and `evaluate` and `export` of a checkpoint. What predict.py and evaluate.py
use, and what a notebook uses:

    model = finetune.load("outputs/runs/2026-12-08_10-00-00-000000")
    for p in model.predict(["a.jpg", "photos/", pil_image, uint8_array]):
        print(p.input, p.label, p.top)

An exported model runs with onnxruntime, numpy and Pillow alone: loading and predicting with it imports no torch."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.samples import is_image_file
from finetune.errors import ConfigError
from finetune.tasks import Task


@dataclass
class Prediction:
    """What the model says of one input: `label` (the top class; the labels over their thresholds, for multi-label;
    the value, for regression), `top` ([(name, probability or value)], best first: predict's rows), and every class's
    or label's `probabilities` (None for regression, whose `value` it is). `error` says why an input could not be
    read (label and top are then None and empty)."""

    input: str
    label: str | list[str] | float | None
    top: list[tuple[str, float]] = field(default_factory=list)
    probabilities: dict[str, float] | None = None
    value: float | None = None
    error: str | None = None


class Model:
    """A trained model, whatever holds it: `kind` is "checkpoint" (a run's best.ckpt, or any checkpoint file) or
    "onnx" (an export and its sidecar)."""

    def __init__(self, path: Path, kind: str, net: Any):
        self.path, self.kind, self.net = path, kind, net

    @property
    def classes(self) -> list[str]:
        """The class names (the labels, for multi-label; the target's name, for regression)."""
        return list(self.net.classes)

    @property
    def task(self) -> Task:
        return self.net.task

    @property
    def thresholds(self) -> list[float] | None:
        """Multi-label: each label's threshold, fitted on the validation split after training."""
        return self.net.thresholds

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {self.kind}, task={self.task}, {len(self.classes)} {self.task.plural})"

    def outputs(self, inputs: list, *, batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                max_pixels: int = 100_000_000, progress: bool = False) -> tuple[np.ndarray, dict[int, str]]:
        """The model's outputs for `inputs` (file paths, PIL images or uint8 HxWx3 RGB arrays; folders already
        expanded): class or label probabilities, or the value (one column), a NaN row for an input that cannot be
        read; and {position: why} of those."""
        files = [i for i, x in enumerate(inputs) if isinstance(x, (str, Path))]
        pixels = [i for i, x in enumerate(inputs) if not isinstance(x, (str, Path))]
        out = np.full((len(inputs), len(self.classes)), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        for positions, files_or_images in ((files, True), (pixels, False)):
            if not positions:
                continue
            chosen = [inputs[i] for i in positions]
            if self.kind == "onnx":
                values, wrong = (self.net.probabilities([str(p) for p in chosen], batch_size, max_pixels, progress)
                                 if files_or_images else self.net.probabilities_of_images([_rgb(x) for x in chosen]))
            else:
                values, wrong = self._checkpoint_outputs(chosen, files_or_images, batch_size, num_workers, device,
                                                         max_pixels, progress)
            out[positions] = values
            failed.update({positions[i]: why for i, why in wrong.items()})
        return out, failed

    def _checkpoint_outputs(self, chosen: list, files: bool, batch_size: int, num_workers: int, device: str,
                            max_pixels: int, progress: bool) -> tuple[np.ndarray, dict[int, str]]:
        from finetune.data.samples import Source
        from finetune.inference import probabilities, resolve_device

        n = len(chosen)
        if files:
            source = Source(self.classes, [str(p) for p in chosen], np.zeros(n, dtype=np.int64))
        else:
            images = np.empty(n, dtype=object)  # each image its own size
            for i, x in enumerate(chosen):
                images[i] = np.asarray(_rgb(x))
            source = Source(self.classes, [f"image {i}" for i in range(n)], np.zeros(n, dtype=np.int64),
                            images=images)
        return probabilities(self.net, source, np.arange(n), batch_size=batch_size, num_workers=num_workers,
                             device=resolve_device(device), max_pixels=max_pixels, progress=progress)

    def predict(self, inputs, *, top_k: int = 5, batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                max_pixels: int = 100_000_000) -> list[Prediction]:
        """One Prediction per input: a file path, a folder (its images, searched recursively, in order), a glob
        pattern, a PIL image or a uint8 HxWx3 RGB array, or a list of them. `top_k`: how many classes `top` holds
        for a model of one class per image."""
        inputs = expand(inputs)
        out, failed = self.outputs(inputs, batch_size=batch_size, num_workers=num_workers, device=device,
                                   max_pixels=max_pixels, progress=False)
        task, classes = self.task, self.classes
        predictions = []
        for i, x in enumerate(inputs):
            name = str(x) if isinstance(x, (str, Path)) else f"image {i}"
            if i in failed:
                predictions.append(Prediction(name, None, error=failed[i]))
                continue
            top = task.decide(out[i], classes, self.thresholds, min(top_k, len(classes)))
            value = task.value_of(top)
            predictions.append(Prediction(name, task.label_of(top), top, task.probabilities_of(out[i], classes),
                                          value))
        return predictions

    def evaluate(self, *overrides: str) -> dict:
        """evaluate.py's figures and files for this checkpoint (`split=val`, `dataset=NAME dataset.root=DIR`, `out=DIR`
        as its command line takes them); its metrics."""
        from finetune.api import compose

        self._a_checkpoint("evaluate")
        from finetune.evaluate import run

        return run(compose(f"ckpt={self.path}", *overrides, config="evaluate"))

    def export(self, *overrides: str) -> dict:
        """export.py for this checkpoint (`format=onnx quantize=int8 out=FILE` as its command line takes them): where
        the exported model is, and its measurements."""
        from finetune.api import compose

        self._a_checkpoint("export")
        from finetune.export import run

        return run(compose(f"ckpt={self.path}", *overrides, config="export"))

    def _a_checkpoint(self, what: str) -> None:
        if self.kind != "checkpoint":
            raise ConfigError(f"{self.path} is an exported model: {what} takes a checkpoint or a run directory (the "
                              "export was made from one)")


def load(path: str | Path, kind: str | None = None) -> Model:
    """The model at `path`: a finetune run directory (its checkpoints/best.ckpt), a checkpoint file, or an exported
    .onnx model (its .json sidecar beside it). `kind` ("checkpoint", "onnx"): what the path must be, where the
    caller was told (predict.py's ckpt= and model=); None: as the path says."""
    path = Path(path).expanduser()
    if kind == "onnx" or (kind is None and path.suffix == ".onnx"):
        from finetune.exported import ExportedModel

        return Model(path, "onnx", ExportedModel(path))
    from finetune.models.module import load_module, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    return Model(checkpoint, "checkpoint", load_module(checkpoint))


def find_inputs(inputs: str) -> list[str]:
    """Image files named by `inputs`: a file, a folder (searched recursively) or a glob pattern."""
    if any(c in inputs for c in "*?["):
        found = sorted(p for p in glob.glob(os.path.expanduser(inputs), recursive=True) if os.path.isfile(p))
    elif os.path.isdir(os.path.expanduser(inputs)):
        found = []
        for folder, dirs, files in os.walk(os.path.expanduser(inputs)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(folder, f) for f in sorted(files) if is_image_file(f)]
    elif os.path.isfile(os.path.expanduser(inputs)):
        found = [os.path.expanduser(inputs)]
    else:
        raise ConfigError(f"inputs={inputs}: no such file or folder")
    if not found:
        raise ConfigError(f"inputs={inputs}: no image files there")
    return found


def expand(inputs) -> list:
    """`inputs` as a list of single inputs: folders and glob patterns expanded into their image files."""
    if isinstance(inputs, (str, Path)) or not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    expanded = []
    for x in inputs:
        if isinstance(x, (str, Path)):
            path = Path(x).expanduser()
            expanded += find_inputs(str(x)) if path.is_dir() or any(c in str(x) for c in "*?[") else [str(path)]
        else:
            expanded.append(x)
    return expanded


def _rgb(image):
    """A PIL image or an HxWx3 (or HxW) uint8 array as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ConfigError(f"an image given as an array must be uint8 HxWx3 RGB (got {array.dtype} {array.shape})")
    return Image.fromarray(array).convert("RGB")
