"""finetune.evaluate.run: metrics, a classification report and figures for a checkpoint, on its run's test split
or on any labelled dataset."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune import rundir
from finetune.calibration import ece, nll, reliability_figure, rescale
from finetune.data.dataset import load_image
from finetune.data.pipeline import apply_split_file, drop_unusable, subset
from finetune.data.readers import DataError, Source, read_dataset
from finetune.errors import ConfigError
from finetune.inference import probabilities, resolve_device
from finetune.loggers import log_evaluation
from finetune.models.module import load_module, resolve_checkpoint
from finetune.plots import confusion_matrix_figure, curves_figure, image_grid_figure
from finetune.rundir import free_path, run_dir_of, write_json
from finetune.tasks import Task, task_of

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.ckpt; write metrics.json, the classification report, the confusion matrix, curves and top
    losses into the output folder; return the metrics."""
    ckpt = resolve_checkpoint(cfg.ckpt)
    device = resolve_device(cfg.device)
    model = load_module(ckpt, map_location="cpu")
    run_dir = run_dir_of(ckpt)
    out = output_folder(cfg.out, run_dir)
    try:
        source, indices, described = evaluation_set(cfg, model.classes, run_dir, out, task=model.task)
    except BaseException:
        if not any(out.iterdir()):  # nothing to evaluate on: no empty eval folder is left behind
            out.rmdir()
        raise
    log.info("Evaluating %s on %s (%s images)%s; writing into %s", ckpt, described, f"{len(indices):,}",
             " with ten-crop TTA" if cfg.tta else "", out)

    raw, failed = probabilities(model, source, indices, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                device=device, tta=cfg.tta, max_pixels=cfg.max_pixels, progress=True, temperature=1.0)
    ok = np.array([i not in failed for i in range(len(indices))], dtype=bool)
    for i, reason in failed.items():
        log.warning("Could not evaluate %s: %s", source.paths[indices[i]], reason)
    if not ok.any():
        raise DataError(f"none of the {len(indices)} images could be loaded (see the warnings above)")
    report = Report(cfg, model, ckpt, run_dir, out, source, indices[ok], raw[ok], len(failed), described, device)
    metrics, summary = model.task.evaluate(report)  # evaluate_classes, evaluate_labels or evaluate_values
    metrics.update({"task": model.task.name, "images": len(report.indices), "unreadable": len(failed),
                    "checkpoint": str(ckpt), "evaluated_on": described, "tta": bool(cfg.tta)})
    write_json(out / rundir.METRICS, metrics)
    write_curves(out / "curves.png", run_dir, model.task.monitor.split("/", 1)[1])
    log.info("%s", summary)
    log.info("Evaluation written to %s", out)
    log_evaluation(run_dir, out, {k: v for k, v in metrics.items() if not isinstance(v, dict)})  # to its MLflow run
    return metrics


@dataclass
class Report:
    """What evaluate measured: the model's raw outputs (probabilities at temperature 1, label probabilities, values) on
    the images `indices` of `source` that could be read, and where its files go."""

    cfg: DictConfig
    model: Any
    ckpt: Path
    run_dir: Path
    out: Path
    source: Source
    indices: np.ndarray
    outputs: np.ndarray
    unreadable: int
    described: str
    device: Any

    def classes(self) -> tuple[dict, str]:
        return evaluate_classes(self)

    def labels(self) -> tuple[dict, str]:
        return evaluate_labels(self)

    def values(self) -> tuple[dict, str]:
        return evaluate_values(self)


def evaluate_classes(r: Report) -> tuple[dict, str]:
    """One class per image: accuracy, balanced accuracy, F1, log loss and calibration (before and after the
    temperature), intervals; the classification report, confusion matrix, predictions, reliability diagram and the
    top losses."""
    cfg, model, source, raw = r.cfg, r.model, r.source, r.outputs
    labels = source.labels[r.indices]
    probs = rescale(raw, model.temperature)  # what predict and the export give: calibrated
    if cfg.tta and model.temperature != 1.0:  # predict scales each crop before averaging: so must this
        probs, _ = probabilities(model, source, r.indices, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 device=r.device, tta=True, max_pixels=cfg.max_pixels)
    classes = model.classes
    metrics = compute_metrics(probs, labels, len(classes))
    metrics.update(intervals(probs.argmax(1), labels, classes))
    metrics.update({"temperature": model.temperature, "nll_before": nll(raw, labels), "nll_after": nll(probs, labels),
                    "ece_before": ece(raw, labels), "ece_after": ece(probs, labels)})
    write_report(r.out, labels, probs.argmax(1), classes)
    write_confusion(r.out, labels, probs.argmax(1), classes)
    write_predictions(r.out / "predictions.csv", [source.paths[j] for j in r.indices], labels, probs, classes)
    _save(reliability_figure(raw, probs, labels, model.temperature), r.out / "reliability.png")
    write_top_losses(r.out / "top_losses.png", source, r.indices, labels, probs, classes, cfg.top_losses,
                     cfg.max_pixels)
    top5 = f"  top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""
    return metrics, (f"accuracy {metrics['accuracy']:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
                     f"macro F1 {metrics['macro_f1']:.4f}  log loss {metrics['log_loss']:.4f}  "
                     f"ECE {metrics['expected_calibration_error']:.4f}{top5}")


def evaluate_labels(r: Report) -> tuple[dict, str]:
    """Multi-label: mAP, F1 at the model's thresholds, a table per label, predictions and precision-recall curves."""
    from finetune.plots import precision_recall_figure
    from finetune.scores import multilabel_scores

    model, outputs = r.model, r.outputs
    classes, targets = model.classes, r.source.targets[r.indices]
    metrics = multilabel_scores(outputs, targets, model.thresholds, classes)
    with open(r.out / "per_label.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["label", "ap", "f1", "precision", "recall", "threshold", "images"])
        for name, row in metrics["per_label"].items():
            writer.writerow([name, *(row[key] for key in ("ap", "f1", "precision", "recall", "threshold", "images"))])
    with open(r.out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "labels", "predicted", *classes])
        for j, y, p in zip(r.indices, targets, outputs):
            writer.writerow([r.source.paths[j], "|".join(c for c, on in zip(classes, y) if on > 0.5),
                             "|".join(c for c, x, t in zip(classes, p, model.thresholds) if x >= t),
                             *(f"{x:.6f}" for x in p)])
    _save(precision_recall_figure(outputs, targets, classes, model.thresholds), r.out / "pr_curves.png")
    if metrics["map"] is None:
        return metrics, f"no label has positives here; F1 micro {metrics['f1_micro']:.4f}"
    return metrics, (f"mAP {metrics['map']:.4f}  F1 macro {metrics['f1_macro']:.4f}  micro {metrics['f1_micro']:.4f} "
                     "(at the thresholds fitted on the validation split)")


def evaluate_values(r: Report) -> tuple[dict, str]:
    """Regression: MAE, RMSE, R^2 and the MAE of predicting the mean; predictions and predicted against true."""
    from finetune.plots import regression_figure
    from finetune.scores import regression_scores

    target, targets, predicted = r.model.classes[0], r.source.targets[r.indices], r.outputs[:, 0]
    metrics = regression_scores(predicted, targets)
    with open(r.out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", target, "predicted", "error"])
        writer.writerows((r.source.paths[j], f"{y:.6g}", f"{p:.6g}", f"{p - y:.6g}") for j, y, p in
                         zip(r.indices, targets, predicted))
    _save(regression_figure(predicted, targets, target), r.out / "predicted_vs_true.png")
    r2 = f"{metrics['r2']:.4f}" if metrics["r2"] is not None else "none (a constant target)"
    return metrics, (f"MAE {metrics['mae']:.4f}  RMSE {metrics['rmse']:.4f}  R^2 {r2}  (predicting the mean: MAE "
                     f"{metrics['mae_of_the_mean']:.4f})")


def output_folder(out: str | None, run_dir: Path) -> Path:
    """out, or RUN_DIR/eval (eval-2, ... if taken): an earlier evaluation is never overwritten."""
    if out is not None:
        folder = Path(out)
        if (folder / rundir.METRICS).exists():
            raise ConfigError(f"out={out} already holds an evaluation (metrics.json): choose another out=")
    else:
        folder = free_path(run_dir / "eval")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def evaluation_set(cfg: DictConfig, classes: list[str], run_dir: Path, out: Path,
                   task: Task | None = None) -> tuple[Source, np.ndarray, str]:
    """The images to evaluate on, labelled as the model's `task` reads them (in the model's class order), and a
    description of them."""
    task = task_of(task)
    if cfg.get("dataset") is not None:
        d = cfg.dataset
        if OmegaConf.is_missing(d, "root") and d.name != "hf":
            raise ConfigError(f"dataset={d.name}: give its folder with dataset.root=DIR")
        source = task.align(read_dataset(d, task), classes, d.name)
        source = drop_unusable(source, d.root, cfg.max_pixels, d.get("max_bad_fraction", 0.05), out / rundir.SKIPPED,
                               workers=cfg.num_workers)
        return source, np.arange(len(source)), f"dataset={d.name} ({d.root or d.get('path')}), all of it"
    config, split_file = run_dir / rundir.CONFIG, run_dir / rundir.SPLIT
    if not (config.is_file() and split_file.is_file()):
        raise ConfigError(f"{cfg.ckpt} is not in a run directory with config.yaml and split.csv: give the images to "
                          "evaluate on with dataset=NAME dataset.root=DIR")
    d = OmegaConf.load(config).dataset
    moved = None
    if cfg.get("root") is not None:  # the dataset moved since training: split.csv's paths are read below root=
        if d.get("root") is None:
            raise ConfigError(f"root={cfg.root}: dataset={d.name} of {run_dir} has no folder to move")
        moved = (str(Path(d.root).expanduser()), str(Path(cfg.root).expanduser()))
        d.root = cfg.root
    elif d.get("root") is not None and not Path(d.root).expanduser().is_dir():
        raise DataError(f"the dataset {run_dir} was trained on is not in {d.root} any more: if the dataset moved, "
                        "give its new folder with root=DIR")
    source = apply_split_file(read_dataset(d, task), split_file, only=cfg.split, moved=moved,
                              hint="; if the dataset moved, give its new folder with root=DIR" if moved is None else "")
    if list(source.classes) != list(classes):
        raise DataError(f"the classes of {run_dir}'s dataset changed since training: {source.classes} != {classes}")
    chosen = np.array([s == cfg.split for s in source.splits])
    if not chosen.any():
        raise DataError(f"{split_file} has no '{cfg.split}' images: choose split=train, val or test")
    source = drop_unusable(subset(source, np.flatnonzero(chosen)), d.root, cfg.max_pixels, 1.0, out / rundir.SKIPPED,
                           workers=cfg.num_workers)
    return source, np.arange(len(source)), f"the {cfg.split} split of {run_dir}"


def intervals(predicted: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """95% Wilson intervals: of the accuracy, and of each class's recall (with its number of images)."""
    from finetune.stats import wilson

    correct = predicted == labels
    overall = wilson(int(correct.sum()), len(labels))
    per_class = {}
    for k, name in enumerate(classes):
        members = labels == k
        n = int(members.sum())
        if n:
            low, high = wilson(int(correct[members].sum()), n)
            per_class[name] = {"recall": round(float(correct[members].mean()), 4), "ci95": [round(low, 4),
                               round(high, 4)], "images": n}
    return {"accuracy_ci95": [round(overall[0], 4), round(overall[1], 4)], "recall_per_class": per_class}


def compute_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int, bins: int = 15) -> dict:
    """Accuracy, balanced accuracy, macro F1 (over the classes present), clipped log loss as Kaggle scores it,
    top-5 accuracy (more than 5 classes) and expected calibration error (15 equal-width confidence bins)."""
    import torch
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from torchmetrics.functional.classification import multiclass_calibration_error

    predicted = probs.argmax(1)
    present = sorted(set(labels.tolist()))
    clipped = np.clip(probs.astype(np.float64), 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(1, keepdims=True)
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "log_loss": float(-np.log(clipped[np.arange(len(labels)), labels]).mean()),
        "expected_calibration_error": float(multiclass_calibration_error(
            torch.from_numpy(probs), torch.from_numpy(labels), num_classes=num_classes, n_bins=bins, norm="l1")),
    }
    if num_classes > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == labels[:, None]).any(1).mean())
    return metrics


def write_report(out: Path, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> None:
    """classification_report.txt and .csv: precision, recall, F1 and support per class, as scikit-learn gives them."""
    from sklearn.metrics import classification_report

    present = sorted(set(labels.tolist()) | set(predicted.tolist()))
    names = [classes[i] for i in present]
    kwargs = {"labels": present, "target_names": names, "zero_division": 0}
    (out / "classification_report.txt").write_text(classification_report(labels, predicted, digits=4, **kwargs))
    report = classification_report(labels, predicted, output_dict=True, **kwargs)
    with open(out / "classification_report.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["class", "precision", "recall", "f1-score", "support"])
        for name in [*names, "macro avg", "weighted avg"]:
            row = report[name]
            writer.writerow([name, row["precision"], row["recall"], row["f1-score"], int(row["support"])])


def write_confusion(out: Path, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> None:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix):
            writer.writerow([name, *row.tolist()])
    _save(confusion_matrix_figure(matrix, classes), out / "confusion_matrix.png")


def write_predictions(path: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    predicted = probs.argmax(1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "predicted", "probability", "correct"])
        for p, y, k, row in zip(paths, labels, predicted, probs):
            writer.writerow([p, classes[y], classes[k], f"{row[k]:.6f}", int(y == k)])


def read_history(run_dir: Path) -> dict[str, dict[int, float]]:
    """{metric: {epoch: value}} from the run's CSV logs (csv/version_*/metrics.csv, in order; a resumed run's later
    segments win), for train/val loss and accuracy (mAP, MAE)."""
    history: dict[str, dict[int, float]] = {}
    for file in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(file, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("epoch"):
                    continue
                for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/map", "train/mae", "val/mae"):
                    if row.get(key):
                        history.setdefault(key, {})[int(float(row["epoch"]))] = float(row[key])
    return history


def write_curves(path: Path, run_dir: Path, metric: str = "acc") -> None:
    history = read_history(run_dir)
    if not history:
        log.info("No CSV logs in %s (logger.csv was off): curves.png is not written", run_dir)
        return
    _save(curves_figure(history, title=run_dir.name, metric=metric), path)


def write_top_losses(path: Path, source: Source, indices: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                     classes: list[str], count: int, max_pixels: int) -> None:
    """The most confidently wrong images: highest probability on a wrong class first, as fastai's plot_top_losses."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:count]
    if not len(order):
        log.info("No wrong predictions: top_losses.png is not written")
        return
    images, titles = [], []
    for i in order:
        image = load_image(source, indices[i], max_pixels)
        image.thumbnail((256, 256))
        images.append(np.asarray(image))
        k, y = predicted[i], labels[i]
        titles.append(f"predicted {classes[k]} ({probs[i, k]:.2f})\ntrue {classes[y]} ({probs[i, y]:.2f})")
    _save(image_grid_figure(images, titles, ["firebrick"] * len(images),
                            title="Most confidently wrong: predicted (probability) / true (its probability)"), path)


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=110)
