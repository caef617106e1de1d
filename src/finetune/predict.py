"""finetune.predict.run: what a model says of images, files or folders (the top-k classes; the labels over their
thresholds; the value), from a checkpoint alone or from an exported ONNX model and its sidecar (onnxruntime, no
PyTorch model)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from finetune.errors import ConfigError
from finetune.rundir import free_path

log = logging.getLogger(__name__)

FORMATS = ("csv", "json", "kaggle")


def run(cfg: DictConfig) -> dict:
    """Predict cfg.inputs; print and write each image's prediction. Returns {"classified", "failed", "out"};
    images that could not be read are reported one by one and the others are still classified."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: one of {', '.join(FORMATS)}")
    if cfg.top_k < 1:
        raise ConfigError(f"top_k must be >= 1 (got {cfg.top_k})")
    given = [key for key in ("ckpt", "model") if cfg.get(key) is not None]
    if len(given) != 1:
        raise ConfigError("give the model to classify with: ckpt=RUN_DIR/checkpoints/best.ckpt or model=PATH.onnx "
                          "(an export), " + ("not both" if given else "neither was given"))
    from finetune.model import find_inputs, load

    paths = find_inputs(str(cfg.inputs))

    # one Model whatever it is: a checkpoint, or an export (onnxruntime, numpy and Pillow: no torch)
    model = load(cfg.model, kind="onnx") if given == ["model"] else load(cfg.ckpt, kind="checkpoint")
    classes = model.classes
    task = model.task  # finetune.tasks: what the outputs are, and how a prediction is decided and written
    if cfg.format == "kaggle" and not task.one_class_per_image:
        raise ConfigError(f"format=kaggle writes class probabilities; this model is task={task}: format=csv or json")
    out = output_path(cfg.out, cfg.format)
    if cfg.format == "kaggle":
        kaggle_header(classes)  # refuse before any work if the model fits neither competition
    probs, failed = model.outputs(paths, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
                                  max_pixels=cfg.max_pixels, progress=len(paths) > cfg.batch_size)
    k = min(cfg.top_k, len(classes))
    results = []
    for i, path in enumerate(paths):
        if i in failed:
            log.error("%s: not classified (%s)", path, failed[i])
            continue
        results.append((path, task.decide(probs[i], classes, model.thresholds, k), probs[i]))
        print(f"{path}: {task.said(results[-1][1])}")
    write(out, cfg.format, results, classes, task)
    log.info("Classified %d of %d images; %s written", len(results), len(paths), out)
    if failed:
        log.error("%d images could not be classified (listed above)", len(failed))
    return {"classified": len(results), "failed": len(failed), "out": str(out)}


def output_path(out: str | None, fmt: str) -> Path:
    if out is None:
        return free_path(Path({"csv": "predictions.csv", "json": "predictions.json", "kaggle": "submission.csv"}[fmt]))
    path = Path(out)
    if path.exists():
        raise ConfigError(f"out={out} exists already: choose another name (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def kaggle_header(classes: list[str]) -> list[str]:
    """Dogs vs. Cats: id,label (the probability of dog). Dog breed identification: id and one column per breed."""
    if [c.lower() for c in classes] == ["cat", "dog"]:
        return ["id", "label"]
    if len(classes) > 2:
        return ["id", *classes]
    raise ConfigError(f"format=kaggle: a model of classes {classes} fits neither Kaggle's dogs-vs-cats (cat, dog) "
                      "nor dog-breed-identification")


def write(out: Path, fmt: str, results: list, classes: list[str], task) -> None:
    """The predictions in `fmt`, as `task` (finetune.tasks) writes a row: the top-k classes with their probabilities; a
    multi-label model's labels over their thresholds (every label's probability in JSON); a regression model's
    value."""
    if fmt == "json":
        rows = [task.json_row(path, decided, every, classes) for path, decided, every in results]
        out.write_text(json.dumps(rows, indent=2) + "\n")
        return
    with open(out, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if fmt == "csv":
            writer.writerow(task.csv_header(classes))
            for path, decided, _ in results:
                writer.writerows(task.csv_rows(path, decided))
            return
        header = kaggle_header(classes)
        writer.writerow(header)
        rows = sorted(results, key=lambda r: _kaggle_id_key(Path(r[0]).stem))
        for path, _, p in rows:
            image_id = Path(path).stem
            if header == ["id", "label"]:
                writer.writerow([image_id, f"{p[[c.lower() for c in classes].index('dog')]:.6f}"])
            else:
                writer.writerow([image_id, *(f"{x:.6f}" for x in p)])


def _kaggle_id_key(stem: str) -> tuple:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)
