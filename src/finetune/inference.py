"""Class probabilities for many images, batched, on CPU or GPU, from a checkpoint or an exported ONNX model; what
evaluate and predict share."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from finetune.data.dataset import load_image
from finetune.data.integrity import failure_reason
from finetune.data.samples import Source
from finetune.data.transforms import Preprocessing, _interpolation, eval_transform
from finetune.exported import ExportedModel
from finetune.models.module import ImageModule


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def preprocessing_of(model: ImageModule | ExportedModel) -> Preprocessing:
    if isinstance(model, ExportedModel):  # mean and std are applied inside the graph
        return Preprocessing(model.image_size, float(model.pre["crop_pct"]), str(model.pre["interpolation"]),
                             (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
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


def probabilities(model: ImageModule | ExportedModel, source: Source, indices: np.ndarray, *, batch_size: int = 64,
                  num_workers: int = 0, device: torch.device | None = None, tta: bool = False,
                  max_pixels: int = 100_000_000, progress: bool = False,
                  temperature: float | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Softmax probabilities (len(indices) x classes; NaN rows for failed images) and {position: reason} of the
    images that could not be loaded; for a multi-label model each label's probability (sigmoid), for a regression
    model the value in the target's units (one column). With `tta`, each image's probabilities are the mean over its
    ten crops.
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
            return model.outputs(model(images.to(device, non_blocking=True)), t).cpu().numpy()
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
