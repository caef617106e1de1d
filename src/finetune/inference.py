"""Class probabilities for many images, batched, on CPU or GPU, from a checkpoint or an exported ONNX model; what
evaluate and predict share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from finetune.config import ConfigError
from finetune.data.datamodule import load_image
from finetune.data.integrity import failure_reason
from finetune.data.sources import Source
from finetune.data.transforms import Preprocessing, _interpolation, eval_transform
from finetune.models.classifier import Classifier


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
            self.classes = list(meta["output"]["classes"])
            self.softmax_inside = bool(meta.get("inside_the_model", {}).get("softmax", True))
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
    def preprocessing(self) -> Preprocessing:
        """The evaluation transform the model was trained with (mean and std are applied inside the graph)."""
        return Preprocessing(int(self.pre["crop"]), float(self.pre["crop_pct"]), str(self.pre["interpolation"]),
                             (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of a uint8 batch (N, 3, H, W)."""
        out = self.session.run(None, {self.input: images})[0]
        if not self.softmax_inside:  # logits: calibrate and normalise here
            out = torch.from_numpy(out / self.temperature).softmax(1).numpy()
        return out


def preprocessing_of(model: Classifier | ExportedModel) -> Preprocessing:
    if isinstance(model, ExportedModel):
        return model.preprocessing
    pre = model.hparams.preprocessing
    return Preprocessing(int(pre["image_size"]), float(pre["crop_pct"]), str(pre["interpolation"]),
                         tuple(pre["mean"]), tuple(pre["std"]))


class TenCropViews:
    """Ten views of an image for test-time augmentation: the centre and four corner crops, each also flipped
    (torchvision's ten_crop), after the evaluation resize; a (10, 3, H, W) uint8 tensor."""

    def __init__(self, pre: Preprocessing):
        self.resize = v2.Resize(pre.resize_size,
                                interpolation=_interpolation(pre.interpolation), antialias=True)
        self.size = pre.image_size

    def __call__(self, image) -> torch.Tensor:
        crops = v2.functional.ten_crop(self.resize(image), self.size)
        return torch.stack([v2.functional.pil_to_tensor(crop) for crop in crops])


class InferenceImages(Dataset):
    """Samples `indices` of `source` as model input; an image that cannot be loaded is reported, not replaced.
    JPEGs are decoded at the size the evaluation transform resizes to, as during training."""

    def __init__(self, source: Source, indices: np.ndarray, transform, max_pixels: int, draft: int):
        self.source, self.indices, self.transform = source, indices, transform
        self.max_pixels, self.draft = max_pixels, draft

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        j = self.indices[i]
        try:
            return self.transform(load_image(self.source, j, self.max_pixels, self.draft)), i, ""
        except Exception as e:
            return None, i, failure_reason(e, None if self.source.images is not None else self.source.paths[j])


def _collate(items):
    good = [(image, i) for image, i, error in items if image is not None]
    failed = [(i, error) for image, i, error in items if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [i for _, i in good], failed


def probabilities(model: Classifier | ExportedModel, source: Source, indices: np.ndarray, *, batch_size: int = 64,
                  num_workers: int = 0, device: torch.device | None = None, tta: bool = False,
                  max_pixels: int = 100_000_000, progress: bool = False,
                  temperature: float | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Softmax probabilities (len(indices) x classes; NaN rows for failed images) and {position: reason} of the
    images that could not be loaded. With `tta`, each image's probabilities are the mean over its ten crops.
    The logits are divided by `temperature`, by default the model's own (calibrated after training). An
    ExportedModel runs on the CPU with onnxruntime, its own temperature inside it."""
    exported = isinstance(model, ExportedModel)
    device = torch.device("cpu") if exported else device or resolve_device()
    t = float(model.temperature if temperature is None else temperature)
    if exported and t != model.temperature:
        raise ValueError("an exported model's temperature is inside its graph")
    pre = preprocessing_of(model)
    transform = TenCropViews(pre) if tta else eval_transform(pre)
    images = InferenceImages(source, indices, transform, max_pixels, draft=pre.resize_size)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    if exported:
        forward = model
    else:
        model = model.to(device).eval()

        def forward(images):
            return (model(images.to(device, non_blocking=True)).float() / t).softmax(1).cpu().numpy()
    out = np.full((len(indices), len(model.classes)), np.nan, dtype=np.float32)
    failed: dict[int, str] = {}
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, total=len(loader), unit="batch", desc="classifying")
    with torch.inference_mode():
        for images, positions, errors in batches:
            failed.update(dict(errors))
            if images is None:
                continue
            if images.dim() == 5:  # (batch, views, C, H, W)
                b, views = images.shape[:2]
                p = forward(images.flatten(0, 1).numpy() if exported else images.flatten(0, 1))
                p = p.reshape(b, views, -1).mean(1)
            else:
                p = forward(images.numpy() if exported else images)
            out[positions] = p
    return out, failed
