"""finetune.export.run: a checkpoint as an ONNX (float32, fp16 or int8) or TorchScript model for phones and servers,
checked for parity, and its accuracy, size and CPU latency measured on the run's test split beside PyTorch's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from finetune import rundir
from finetune.errors import ConfigError, FinetuneError, require_extra
from finetune.model_card import write_export_card
from finetune.models.module import (
    ImageModule,
    load_module,
    normalize,
    resolve_checkpoint,
    two_class_logits,
)
from finetune.rundir import run_dir_of
from finetune.tasks import TASKS

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# format=onnx: torch's exporter (onnxscript), the model (onnx), and its measurement and quantization (onnxruntime)
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
# quantize=: what each choice writes. The config check, the exporter and README read this table.
QUANTIZE = {
    "none": "float32 weights and arithmetic",
    "fp16": "float16 weights and arithmetic (input uint8, output float32 as before); half the size",
    "int8": "static int8 (onnxruntime QDQ, per-channel weights), calibrated on the run's training images",
}
TOLERANCE = 1e-4


class Deployable(nn.Module):
    """uint8 RGB images (N, 3, H, W) in, class probabilities (N, classes) out: normalisation and softmax inside. A
    multi-label model gives each label's probability (sigmoid), a regression model the value in the target's units
    (N, 1). A plain nn.Module holding the ImageModule's network, so exporters see no Lightning machinery."""

    def __init__(self, model: ImageModule):
        super().__init__()
        self.backbone, self.head, self.binary = model.backbone, model.head, model.binary
        self.task = model.task
        self.output_name = model.task.output_name
        self.temperature = float(model.temperature)  # a constant in the graph: probabilities are calibrated
        self.target_mean, self.target_std = model.target_mean, model.target_std  # regression: constants too
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(normalize(images, self.mean, self.std)))
        logits = two_class_logits(logits) if self.binary else logits
        return self.task.outputs(logits, self.temperature, self.target_mean, self.target_std)  # as the model's


def check(cfg: DictConfig) -> None:
    """The export's own keys, before any work."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: one of {', '.join(FORMATS)}")
    if cfg.format == "onnx":
        require_extra("onnx", "format=onnx", ONNX_MODULES)
    quantize = str(cfg.get("quantize", "none"))
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize}: one of {', '.join(QUANTIZE)}")
    if quantize != "none" and cfg.format != "onnx":
        raise ConfigError(f"quantize={quantize} is for format=onnx (TorchScript models are exported as float32)")
    drop = cfg.get("max_accuracy_drop")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not drop >= 0):
        raise ConfigError(f"max_accuracy_drop must be a number of accuracy points >= 0, or null to accept any drop "
                          f"(got {drop!r})")
    if not isinstance(cfg.get("measure", True), bool):
        raise ConfigError(f"measure must be true or false (got {cfg.get('measure')!r})")
    cap = cfg.get("eval_images")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"eval_images must be a number of images >= 1, or null for the whole test split "
                          f"(got {cap!r})")


def run(cfg: DictConfig) -> dict:
    """Export cfg.ckpt as cfg.format (quantized as cfg.quantize); check the export against PyTorch; measure both on
    the run's test split; refuse an export that loses more than cfg.max_accuracy_drop points."""
    check(cfg)
    quantize = str(cfg.get("quantize", "none"))
    ckpt = resolve_checkpoint(cfg.ckpt)
    model = load_module(ckpt).float().eval()
    size = int(model.hparams.preprocessing["image_size"])
    run_dir = run_dir_of(ckpt)
    data = RunImages(cfg, model, run_dir, required=quantize == "int8")  # int8 needs the run's images to calibrate
    if quantize == "int8" and data.split_file is None:
        raise ConfigError(f"quantize=int8 calibrates on the run's training images, but {run_dir} has no config.yaml "
                          "and split.csv: export from the run directory the checkpoint was trained in")
    out = output_path(cfg.out, ckpt, cfg.format, quantize)
    deployable = Deployable(model).eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    sidecar = out.with_suffix(".json")
    log.info("Exporting %s as %s%s to %s", ckpt, cfg.format, "" if quantize == "none" else f" ({quantize})", out)
    remove_dead_exports(out.parent)
    # Everything is written in a folder of this process's own first, and moved to its name only once accepted: an
    # export killed on the way (kill -9 too) leaves no model under a final name, only this folder, which the next
    # export in the folder removes.
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=out.parent))
    final_out, final_sidecar = out, sidecar
    out, sidecar = work / out.name, work / sidecar.name
    try:
        float32 = out if quantize == "none" else work / "float32.onnx"
        if cfg.format == "onnx":
            export_onnx(deployable, example, float32, deployable.output_name)
        else:
            export_torchscript(deployable, example, float32)
        difference = parity(deployable, load_exported(float32, cfg.format), size)
        tolerance = parity_tolerance(model)
        if not difference < tolerance:  # the handler below removes what was written
            raise FinetuneError(f"the exported model does not match PyTorch: max abs difference {difference:.3e} >= "
                                f"{tolerance:.1e}; nothing was written")
        if quantize == "int8":
            quantize_int8(float32, out, data.calibration_batches(cfg.calibration_images, cfg.seed), work)
        elif quantize == "fp16":
            convert_fp16(float32, out, model.task.target_scale(model))
        models = {"pytorch float32": lambda images: _torch_run(deployable, images)}
        if quantize != "none":
            models["onnx float32"] = load_exported(float32, "onnx")
        name = f"{cfg.format} {'float32' if quantize == 'none' else quantize}"
        models[name] = load_exported(out, cfg.format)
        sizes = {"onnx float32": float32.stat().st_size / 1e6, name: out.stat().st_size / 1e6}
        measured = cfg.get("measure", True)
        if measured:
            evaluation = measure(models, sizes, data, name, size, limit=cfg.get("eval_images"),
                                 seed=cfg.get("seed", 0))
        else:
            evaluation = {"measured": False, "split": None, "images": 0, "machine": machine(),
                          "models": {m: {"megabytes": sizes[m]} for m in models if m in sizes}}
        description = describe(model, cfg.format, final_out.name, quantize, cfg.get("calibration_images"))
        description["evaluation"] = evaluation
        sidecar.write_text(json.dumps(description, indent=2) + "\n")
        if measured:
            print(table(evaluation))
        else:
            print("measure=false: the export's accuracy and latency are not measured, and max_accuracy_drop is not "
                  "checked")
        exported = evaluation["models"][name]
        drop, limit = evaluation.get("accuracy_drop_points"), cfg.get("max_accuracy_drop")
        if drop is not None and limit is not None and drop > limit:
            raise FinetuneError(
                f"the {name} model {model.task.how_far(drop)} on {evaluation['images']} "
                f"{data.split} images (the table above), more than max_accuracy_drop={limit}: nothing was written. "
                f"Use {'quantize=fp16 or quantize=none' if quantize == 'int8' else 'quantize=none'}, more "
                f"calibration images, or max_accuracy_drop={int(drop) + 1} to accept it")
        out.replace(final_out)  # accepted: the model under its name, then its sidecar
        sidecar.replace(final_sidecar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out, sidecar = final_out, final_sidecar
    megabytes = exported["megabytes"]
    print(f"parity of the float32 graph with PyTorch: max abs difference {difference:.2e} on 3 random images "
          f"(tolerance {tolerance:.1e})")
    latency = (f", CPU latency {exported['ms_per_image_batch1']:.1f} ms per image (batch of 1, median)"
               if "ms_per_image_batch1" in exported else "")
    print(f"{out}: {megabytes:.1f} MB{latency}")
    print(f"{sidecar}: input, output, preprocessing and the measurements above")
    facts = {
        "file": f"`{out.name}` ({megabytes:.1f} MB), described in `{sidecar.name}`", "format": cfg.format,
        "weights": QUANTIZE[quantize], "from": f"`{ckpt}`",
        "input": f"uint8 RGB, NCHW, {size}x{size}, any batch size (`images`)",
        "output": model.task.output_words(model),
        "parity with PyTorch": f"max abs difference {difference:.2e} on 3 images (float32 graph)"}
    if "ms_per_image_batch1" in exported:
        facts["CPU latency"] = (f"{exported['ms_per_image_batch1']:.1f} ms per image at batch 1, "
                                f"{exported['ms_per_image_batch32']:.1f} at batch 32 (median, {evaluation['machine']})")
    if "accuracy" in exported:
        metric = evaluation.get("metric", "accuracy")
        changed = f"; decisions changed on {exported['top1_changed']:.1%}" if "top1_changed" in exported else ""
        facts[metric] = (f"{exported['accuracy']:.4f} on {evaluation['images']} {data.split} images "
                         f"(PyTorch {evaluation['models']['pytorch float32']['accuracy']:.4f}{changed})")
    card = write_export_card(run_dir, out, facts)
    print(f"{card}: the model card, with this export's facts")
    return {"path": str(out), "sidecar": str(sidecar), "max_abs_difference": difference, "megabytes": megabytes,
            "cpu_latency_ms": exported.get("ms_per_image_batch1"), "model_card": str(card), "evaluation": evaluation}


WORK_PREFIX = ".export-"  # FOLDER/.export-PID-XXXX: an export's files while it runs


def remove_dead_exports(folder: Path) -> None:
    """Remove the working folders that exports killed in `folder` left (their process is gone)."""
    if not folder.is_dir():
        return
    for work in folder.glob(f"{WORK_PREFIX}*"):
        pid = work.name[len(WORK_PREFIX):].split("-", 1)[0]
        if not (work.is_dir() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
            log.info("Removed %s, left by an export that was killed", work)
        except PermissionError:  # another user's live process
            pass


def _torch_run(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


def parity_tolerance(model: ImageModule) -> float:
    """TOLERANCE, on probabilities; a regression model's values are in its target's units, where float32 rounding
    alone is about 1e-7 of their size: TOLERANCE of the target's scale (its mean's size or its spread, at least 1)."""
    return TOLERANCE * model.task.scale(model)


def parity(deployable: nn.Module, run_exported, size: int) -> float:
    """Max abs difference between PyTorch's and the exported file's probabilities on 3 seeded random images."""
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return float(np.abs(run_exported(images.numpy()) - _torch_run(deployable, images.numpy())).max())


def output_path(out: str | None, ckpt: Path, fmt: str, quantize: str = "none") -> Path:
    """out, or RUN_DIR/export/best.onnx (best.int8.onnx, best.fp16.onnx; -2, ... if taken): a name whose model,
    sidecar (.json) and card (.model_card.md) are all free, so no earlier export or file of the user's is overwritten
    (or removed when this export fails)."""
    if out is not None:
        path = Path(out)
        taken = [p for p in companions(path) if p.exists()]
        if taken:
            raise ConfigError(f"out={out}: {taken[0]} exists already: choose another name (nothing is overwritten)")
    else:
        stem = ckpt.stem if quantize == "none" else f"{ckpt.stem}.{quantize}"
        first = run_dir_of(ckpt) / "export" / f"{stem}{FORMATS[fmt]}"
        path, n = first, 2
        while any(p.exists() for p in companions(path)):
            path, n = first.with_name(f"{first.stem}-{n}{first.suffix}"), n + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def companions(path: Path) -> tuple[Path, Path, Path]:
    """What an export named `path` writes: the model, its sidecar and its model card."""
    return path, path.with_suffix(".json"), path.with_name(f"{path.stem}.model_card.md")


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, output_name: str = "probabilities") -> None:
    for name in ("onnx_ir", "onnxscript"):  # their passes log every folded constant at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                output_names=[output_name], dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(out))


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; the format is asked for
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(out))


def quantize_int8(float32: Path, out: Path, batches, work: Path) -> None:
    """onnxruntime's static quantization: QDQ, int8 per-channel weights, uint8 activations (U8S8, onnxruntime's fast
    path on x86: 2x the speed of S8S8 measured here) whose ranges come from `batches` (MinMax); the softmax stays
    float, so the probabilities keep their resolution."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    with quiet_root_logger():  # onnxruntime logs each scale it adjusts (78 lines for MobileNetV2) on the root logger
        quant_pre_process(str(float32), str(prepared), skip_symbolic_shape=True)  # folds, fuses and infers shapes
        _quantize(prepared, out, batches)


def _quantize(prepared: Path, out: Path, batches) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(prepared), load_external_data=False).graph
    softmax = sorted(node.name for node in graph.node if node.op_type == "Softmax")

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    quantize_static(str(prepared), str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=softmax)
    # Not extra_options CalibMaxIntermediateOutputs: onnxruntime 1.31 discards every full chunk of batches without
    # taking its ranges (and fails when the batches fill the chunks exactly). Memory follows the batch size (8).


@contextlib.contextmanager
def quiet_root_logger():
    """The root logger at WARNING for a while: a library's INFO records on it stay out of the console and train.log
    (its warnings still show)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def convert_fp16(float32: Path, out: Path, target_scale: tuple[float, float] | None = None) -> None:
    """onnxruntime's float16 converter; uint8 images in and float32 probabilities out as before; the softmax in
    float32. A regression model's last two nodes (x * std + mean, `target_scale`: into the target's units) are taken
    off before and put back after, in float32: float16 ends at 65504, and the converter turns their constants into
    float16 even where it keeps the nodes in float32 (a target of 250,000 came out as inf)."""
    import onnx
    from onnx import numpy_helper
    from onnx.helper import make_node
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(float32))
    if target_scale is not None:
        graph = model.graph
        multiply, add = graph.node[-2:]
        if (multiply.op_type, add.op_type) != ("Mul", "Add"):
            raise FinetuneError(f"{float32}: a regression graph ends in x * std + mean, not in {multiply.op_type} and "
                                f"{add.op_type}: export it with quantize=none")
        output = onnx.ValueInfoProto()
        output.CopyFrom(graph.output[0])
        standardised = onnx.ValueInfoProto()
        standardised.CopyFrom(output)
        standardised.name = multiply.input[0]
        del graph.node[-2:]
        graph.output.pop()
        graph.output.append(standardised)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"])
    if target_scale is not None:
        graph = half.graph
        std, mean = target_scale
        graph.initializer.extend([numpy_helper.from_array(np.array(std, dtype=np.float32), "target_std"),
                                  numpy_helper.from_array(np.array(mean, dtype=np.float32), "target_mean")])
        graph.node.extend([make_node("Mul", [standardised.name, "target_std"], ["scaled_target"]),
                           make_node("Add", ["scaled_target", "target_mean"], [output.name])])
        graph.output.pop()
        graph.output.append(output)
        used = {name for node in graph.node for name in node.input}
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    onnx.save(half, str(out))


def load_exported(path: Path, fmt: str):
    """A function from a uint8 numpy batch to probabilities, running the exported file the way a user would."""
    if fmt == "onnx":
        from finetune.exported import onnx_session

        session = onnx_session(path, spinning=False)  # timed beside PyTorch
        return lambda images: session.run(None, {"images": images})[0]
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return run_torchscript


class RunImages:
    """The run's own images, read as evaluate and predict read them (the evaluation transform, uint8): its test
    split (or val, where the run has no test split) to measure on, its training split to calibrate on."""

    def __init__(self, cfg: DictConfig, model: ImageModule, run_dir: Path, required: bool = False):
        from finetune.data.splits import read_split
        from finetune.errors import DataError

        self.cfg, self.model, self.run_dir = cfg, model, run_dir
        self._read_splits: dict[str, tuple] = {}  # each split is read (and its files scanned) once
        self.split_file = run_dir / rundir.SPLIT
        if not (self.split_file.is_file() and (run_dir / rundir.CONFIG).is_file()):
            self.split_file, self.split = None, None
            return
        present = {split for _, _, split in read_split(self.split_file)}
        self.split = "test" if "test" in present else "val"
        try:
            self._read(self.split)  # a moved or deleted dataset is said now, before the export
        except DataError as e:
            if required:
                raise
            log.warning("The export's accuracy is not measured: %s", e)
            self.split_file = None

    def _read(self, split: str):
        from finetune.evaluate import evaluation_set

        if split in self._read_splits:
            return self._read_splits[split]
        options = OmegaConf.create({"dataset": None, "root": self.cfg.get("root"), "split": split, "ckpt": str(
            self.cfg.ckpt), "max_pixels": self.cfg.max_pixels, "num_workers": self.cfg.num_workers})
        with tempfile.TemporaryDirectory() as scratch:  # unreadable images are named in the log, as evaluate does
            source, indices, _ = evaluation_set(options, self.model.classes, self.run_dir, Path(scratch),
                                                task=self.model.task.name)
        self._read_splits[split] = source, indices
        return source, indices

    def batches(self, split: str, limit: int | None = None, seed: int = 0, batch_size: int = 32):
        """(uint8 images (N, 3, H, W), labels) batches of `split`; `limit` images drawn with `seed`."""
        from torch.utils.data import DataLoader

        from finetune.data.transforms import eval_transform
        from finetune.inference import InferenceImages, _collate, preprocessing_of

        source, indices = self._read(split)
        if limit is not None and limit < len(indices):
            indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
        pre = preprocessing_of(self.model)
        images = InferenceImages(source, indices, eval_transform(pre), self.cfg.max_pixels, draft=pre.resize_size)
        loader = DataLoader(images, batch_size=batch_size, num_workers=self.cfg.num_workers, collate_fn=_collate)
        for batch, positions, _ in loader:
            if batch is not None:
                chosen = indices[positions]
                yield batch.numpy(), source.labels[chosen] if source.targets is None else source.targets[chosen]

    def calibration_batches(self, n: int, seed: int):
        return (images for images, _ in self.batches("train", limit=n, seed=seed, batch_size=8))


def measure(models: dict, sizes: dict, data: RunImages, name: str, size: int, limit: int | None = None,
            seed: int = 0) -> dict:
    """Each model's accuracy on the run's test images (the same uint8 batches for all; at most `limit` of them, a
    sample drawn with `seed`), the exported model's drop in points and its share of changed top-1 against PyTorch,
    file sizes and CPU latency per image. A multi-label model's accuracy is its mAP, and its changed decisions are
    labels decided otherwise at its thresholds; a regression model's is its MAE, and its drop the MAE's rise in
    percent of PyTorch's."""
    task = data.model.task
    result = {"split": data.split, "images": 0, "machine": machine(), "models": {m: {} for m in models}}
    if data.split_file is not None:
        outputs = {m: [] for m in models}
        labels = []
        for images, y in data.batches(data.split, limit=limit, seed=seed):
            labels.append(y)
            for m, forward in models.items():
                outputs[m].append(forward(images))
        result["images"] = int(sum(len(y) for y in labels))
        if labels:
            labels = np.concatenate(labels)
            scored = {m: task.score(np.concatenate(outputs[m]), labels, data.model.thresholds, data.model.classes)
                      for m in models}
            reference = scored["pytorch float32"]
            for m in models:
                result["models"][m]["accuracy"] = scored[m][0]
                if scored[m][1] is not None:
                    result["models"][m]["top1_changed"] = float((scored[m][1] != reference[1]).mean())
            result["metric"] = task.figure
            result["accuracy_drop_points"] = round(task.drop(reference[0], scored[name][0]), 4)
    elif data.split is None:
        log.warning("%s has no split.csv and config.yaml: the export's accuracy is not measured", data.run_dir)
    one = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1)).numpy()
    for _ in range(2):  # side by side, alternating, each keeping its best: the machine's drift cancels out
        for m, forward in models.items():
            for batch in (1, 32):
                key = f"ms_per_image_batch{batch}"
                t = median_latency(forward, one[:batch], repeats=20 if batch == 1 else 5) * 1e3 / batch
                result["models"][m][key] = min(t, result["models"][m].get(key, float("inf")))
    for m, megabytes in sizes.items():
        if m in result["models"]:
            result["models"][m]["megabytes"] = megabytes
    if "onnx float32" in models:
        exported, reference = result["models"][name], result["models"]["onnx float32"]
        result["ratio_to_onnx_float32"] = {
            "size": exported["megabytes"] / reference["megabytes"],
            "latency_batch1": exported["ms_per_image_batch1"] / reference["ms_per_image_batch1"],
            "latency_batch32": exported["ms_per_image_batch32"] / reference["ms_per_image_batch32"]}
    return result


def table(evaluation: dict) -> str:
    """The measurements as a small text table."""
    split = f"{evaluation['images']} {evaluation['split']} images" if evaluation["images"] else "not measured"
    metric = evaluation.get("metric", "accuracy")
    changed_name = {"accuracy": "top-1 changed", "mAP": "labels changed"}.get(metric, "")
    lines = [f"{'model':<18} {metric:>9} {'drop':>6} {changed_name:>14} {'MB':>7} {'ms/img b1':>10} "
             f"{'ms/img b32':>11}   ({metric} on {split}; CPU, {evaluation['machine']})"]
    reference = evaluation["models"]["pytorch float32"].get("accuracy")
    task = next(t for t in TASKS.values() if t.figure == metric)
    for m, r in evaluation["models"].items():
        accuracy = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        drop_ = f"{task.drop(reference, r['accuracy']):.2f}" if "accuracy" in r and m != "pytorch float32" else "-"
        changed = f"{r['top1_changed']:.1%}" if "top1_changed" in r and m != "pytorch float32" else "-"
        megabytes = f"{r['megabytes']:.2f}" if "megabytes" in r else "-"
        lines.append(f"{m:<18} {accuracy:>9} {drop_:>6} {changed:>14} {megabytes:>7} {r['ms_per_image_batch1']:>10.2f} "
                     f"{r['ms_per_image_batch32']:>11.2f}")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def median_latency(run, batch: np.ndarray, repeats: int = 20) -> float:
    for _ in range(2):
        run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def describe(model: ImageModule, fmt: str, filename: str, quantize: str = "none",
             calibration_images: int | None = None) -> dict:
    """What an app needs to feed the exported model and read its output."""
    pre = model.hparams.preprocessing
    size = int(pre["image_size"])
    resize = int(size / pre["crop_pct"])
    description = {
        "model": filename,
        "format": fmt,
        "weights": quantize if quantize != "none" else "float32",
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, size, size], "layout": "NCHW",
                  "colour": "RGB", "range": [0, 255],
                  "prepare": f"resize the short side to {resize} px ({pre['interpolation']}), "
                             f"centre-crop {size}x{size}"},
        "preprocessing": {"resize": resize, "interpolation": pre["interpolation"], "crop": size,
                          "crop_pct": float(pre["crop_pct"])},
        "task": model.task.name,
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["batch", len(model.classes)],
                   "classes": model.classes},
        "inside_the_model": {"normalise": {"mean": pre["mean"], "std": pre["std"], "scale": "x / 255"},
                             "softmax": True, "temperature": float(model.temperature)},
        "temperature": float(model.temperature),
        "backbone": model.hparams.backbone_config["name"],
    }
    description = model.task.describe_output(description, model)
    if quantize == "int8":
        description["quantization"] = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                                       "weights": "int8, per channel", "activations": "uint8, MinMax ranges",
                                       "calibration_images": calibration_images, "float": ["Softmax"]}
    return description
