"""finetune.export.run: a checkpoint as an ONNX or TorchScript model for mobile and servers, checked for parity."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from finetune.cli import free_path
from finetune.config import ConfigError, FinetuneError
from finetune.model_card import write_export_card
from finetune.models.classifier import (
    Classifier,
    load_classifier,
    normalize,
    resolve_checkpoint,
    run_dir_of,
    two_class_logits,
)

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


class Deployable(nn.Module):
    """uint8 RGB images (N, 3, H, W) in, class probabilities (N, classes) out: normalisation and softmax inside.
    A plain nn.Module holding the Classifier's network, so exporters see no Lightning machinery."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.backbone, self.head, self.binary = model.backbone, model.head, model.binary
        self.temperature = float(model.temperature)  # a constant in the graph: probabilities are calibrated
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(normalize(images, self.mean, self.std)))
        logits = two_class_logits(logits) if self.binary else logits
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=1)


def run(cfg: DictConfig) -> dict:
    """Export cfg.ckpt as cfg.format; check the export against PyTorch; report size and CPU latency per image."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: one of {', '.join(FORMATS)}")
    ckpt = resolve_checkpoint(cfg.ckpt)
    model = load_classifier(ckpt).float().eval()
    size = int(model.hparams.preprocessing["image_size"])
    out = output_path(cfg.out, ckpt, cfg.format)
    deployable = Deployable(model).eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    log.info("Exporting %s as %s to %s", ckpt, cfg.format, out)
    if cfg.format == "onnx":
        export_onnx(deployable, example, out)
    else:
        export_torchscript(deployable, example, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(describe(model, cfg.format, out.name), indent=2) + "\n")

    check = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    run_exported = load_exported(out, cfg.format)
    with torch.inference_mode():
        expected = deployable(check).numpy()
    actual = run_exported(check.numpy())
    difference = float(np.abs(actual - expected).max())
    print(f"parity: max abs difference {difference:.2e} on a batch of 3 (tolerance {TOLERANCE:.0e})")
    if not difference < TOLERANCE:
        raise FinetuneError(f"the exported model does not match PyTorch: max abs difference {difference:.3e} >= "
                            f"{TOLERANCE:.0e}; {out} should not be used")
    latency = median_latency(run_exported, check[:1].numpy())
    megabytes = out.stat().st_size / 1e6
    print(f"{out}: {megabytes:.1f} MB, CPU latency {latency * 1e3:.1f} ms per image (batch of 1, median)")
    print(f"{sidecar}: input and output description")
    run_dir = run_dir_of(ckpt)
    card = write_export_card(run_dir, out, {
        "file": f"`{out.name}` ({megabytes:.1f} MB), described in `{sidecar.name}`", "format": cfg.format,
        "from": f"`{ckpt}`", "input": f"uint8 RGB, NCHW, {size}x{size}, any batch size (`images`)",
        "output": f"probabilities over {len(model.classes)} classes (`probabilities`)",
        "parity with PyTorch": f"max abs difference {difference:.2e} on 3 images",
        "CPU latency": f"{latency * 1e3:.1f} ms per image (batch of 1, median, this machine)"})
    print(f"{card}: the model card, with this export's facts")
    return {"path": str(out), "sidecar": str(sidecar), "max_abs_difference": difference, "megabytes": megabytes,
            "cpu_latency_ms": latency * 1e3, "model_card": str(card)}


def output_path(out: str | None, ckpt: Path, fmt: str) -> Path:
    """out, or RUN_DIR/export/model.onnx (model-2.onnx, ... if taken): an earlier export is never overwritten."""
    if out is not None:
        path = Path(out)
        if path.exists():
            raise ConfigError(f"out={out} exists already: choose another name (nothing is overwritten)")
    else:
        run_dir = run_dir_of(ckpt)
        path = free_path(run_dir / "export" / f"{ckpt.stem}{FORMATS[fmt]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                output_names=["probabilities"], dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(out))


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; the format is asked for
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(out))


def load_exported(path: Path, fmt: str):
    """A function from a uint8 numpy batch to probabilities, running the exported file the way a user would."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(["probabilities"], {"images": images})[0]
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return run_torchscript


def median_latency(run, one: np.ndarray, repeats: int = 20) -> float:
    for _ in range(3):
        run(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def describe(model: Classifier, fmt: str, filename: str) -> dict:
    """What an app needs to feed the exported model and read its output."""
    pre = model.hparams.preprocessing
    size = int(pre["image_size"])
    return {
        "model": filename,
        "format": fmt,
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, size, size], "layout": "NCHW",
                  "colour": "RGB", "range": [0, 255],
                  "prepare": f"resize the short side to {int(size / pre['crop_pct'])} px ({pre['interpolation']}), "
                             f"centre-crop {size}x{size}"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["batch", len(model.classes)],
                   "classes": model.classes},
        "inside_the_model": {"normalise": {"mean": pre["mean"], "std": pre["std"], "scale": "x / 255"},
                             "softmax": True, "temperature": float(model.temperature)},
        "temperature": float(model.temperature),
        "backbone": model.hparams.backbone_config["name"],
    }
