"""Train and eval transforms: torchvision.transforms.v2 on PIL images, ending in uint8 CHW tensors.

Normalisation is not here: batches travel as uint8 (a quarter of float32's bytes) and the model normalises them
on its own device, so the same preprocessing ships inside checkpoints and exported models. The tables of the
`augment` choices and their check are here too; torchvision loads only when a transform is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finetune.errors import ConfigError

# augment.crop: how a training image is cut to the input size
CROPS = {
    "random_resized": "a random part of augment.crop_scale of the image's area, resized (the ImageNet recipe)",
    "center": "the evaluation's resize and centre crop: the whole image",
}
# augment.policy: torchvision's automatic augmentation after crop and flip
POLICIES = {"randaugment": "RandAugment(num_ops, magnitude)", "trivialaugment": "TrivialAugmentWide"}


def check(a: Any) -> None:
    """The `augment` config `a`, before any work; one line naming the key."""
    def ok(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    ok(a.crop in CROPS, f"augment.crop must be one of {', '.join(CROPS)} (got {a.crop})")
    ok(0 <= a.hflip <= 1, f"augment.hflip is a probability in [0, 1] (got {a.hflip})")
    ok(0 <= a.zoom < 1, f"augment.zoom must be in [0, 1) (got {a.zoom})")
    ok(0 <= a.translate < 1, f"augment.translate must be in [0, 1) (got {a.translate})")
    ok(a.policy is None or a.policy in POLICIES,
       f"augment.policy must be one of {', '.join(POLICIES)} or null (got {a.policy})")
    ok(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup and augment.cutmix are alphas: >= 0, 0 for off")
    ok(0 <= a.magnitude <= 30 and a.num_ops >= 1, "augment.magnitude must be in 0..30 and augment.num_ops >= 1")
    ok(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
       f"augment.crop_scale must be [min, max] within (0, 1] (got {list(a.crop_scale)})")


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input; stored in checkpoints so no later script has to ask for it."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_size(self) -> int:
        """The short side evaluation resizes to before its centre crop: image_size / crop_pct (256 for 224)."""
        return math.floor(self.image_size / self.crop_pct)

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


def resolve_preprocessing(backbone, image_size: int | None, crop_pct: float | None) -> Preprocessing:
    """The backbone's own input size, crop and mean/std (timm's data config), with the dataset's choices on top."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=backbone)
    return Preprocessing(
        image_size=int(image_size or config["input_size"][-1]),
        crop_pct=float(crop_pct or config.get("crop_pct") or 0.875),
        interpolation=str(config.get("interpolation") or "bilinear"),
        mean=tuple(float(x) for x in config["mean"]),
        std=tuple(float(x) for x in config["std"]),
    )


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def eval_transform(pre: Preprocessing, tensors: bool = False):
    """Resize the short side to image_size / crop_pct, centre-crop image_size (timm's and torchvision's eval).
    On PIL images, ending in a uint8 tensor; with `tensors`, on uint8 CHW tensors (on any device)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(pre.resize_size, interpolation=_interpolation(pre.interpolation), antialias=True),
        v2.CenterCrop(pre.image_size),
        *([] if tensors else [v2.PILToTensor()]),
    ])


def train_transform(pre: Preprocessing, augment, tensors: bool = False):
    """The augmentation preset `augment` (conf/augment) at the model's input size, on PIL images or, with
    `tensors`, on uint8 CHW tensors on any device. MixUp and CutMix work on whole batches, on the device: the
    ImageModule applies them."""
    from torchvision.transforms import InterpolationMode, v2

    interpolation = _interpolation(pre.interpolation)
    if augment.crop == "random_resized":
        steps = [v2.RandomResizedCrop(pre.image_size, scale=tuple(augment.crop_scale),
                                      ratio=tuple(augment.crop_ratio), interpolation=interpolation, antialias=True)]
    else:
        steps = [v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
                 v2.CenterCrop(pre.image_size)]
    if augment.rotation or augment.zoom or augment.translate:
        steps.append(v2.RandomAffine(
            degrees=augment.rotation,
            translate=(augment.translate, augment.translate) if augment.translate else None,
            scale=(1 - augment.zoom, 1 + augment.zoom) if augment.zoom else None,
            interpolation=InterpolationMode.BILINEAR,
        ))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.policy == "randaugment":
        steps.append(v2.RandAugment(num_ops=augment.num_ops, magnitude=augment.magnitude, interpolation=interpolation))
    elif augment.policy == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    if not tensors:
        steps.append(v2.PILToTensor())
    return v2.Compose(steps)
