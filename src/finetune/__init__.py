"""finetune: fine-tune ImageNet backbones on your own images, from the command line or from Python.

    import finetune
    run = finetune.train("dataset=image_folder", "dataset.root=~/data/alpaca")   # the command line's overrides
    model = finetune.load(run.dir)                # a run directory, a checkpoint, or an exported .onnx
    model.predict("photo.jpg")[0].label

Importing finetune is light: torch, Lightning and timm load when a run starts or a checkpoint is loaded."""

from __future__ import annotations

__all__ = ["compose", "train", "load", "Run", "Model", "Prediction"]

_WHERE = {"compose": "finetune.api", "train": "finetune.api", "Run": "finetune.api",
          "load": "finetune.model", "Model": "finetune.model", "Prediction": "finetune.model"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
