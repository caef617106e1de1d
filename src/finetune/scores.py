"""The figures of multi-label and regression models, from their outputs as numpy arrays: what the run's test step
after training, evaluate and the export's measurement all report, computed one way.

Multi-label: average precision per label (the area under its precision-recall curve, as scikit-learn computes it) and
their mean over the labels that have positives (mAP); F1 at per-label thresholds fitted on the validation split, per
label, macro- (mean over labels) and micro-averaged (over all decisions). Regression: MAE, RMSE, R^2."""

from __future__ import annotations

import numpy as np


def fit_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label, the probability threshold that maximises its F1 on (validation) `probs` against 0/1 `targets`: the
    midpoint between the chosen cut's probability and the next one below it, so that a new image close to the cut is
    decided as the validation images were. A label without positives (or every image positive) keeps 0.5."""
    thresholds = []
    for k in range(targets.shape[1]):
        p, y = probs[:, k].astype(np.float64), targets[:, k] > 0.5
        if y.all() or not y.any():
            thresholds.append(0.5)
            continue
        order = np.argsort(-p, kind="stable")
        p_sorted, y_sorted = p[order], y[order]
        true_positive = np.cumsum(y_sorted)
        predicted = np.arange(1, len(p) + 1)
        f1 = 2 * true_positive / (predicted + y.sum())
        # only cuts between distinct probabilities: images with equal probability are decided alike
        cuts = np.flatnonzero(np.append(p_sorted[1:] < p_sorted[:-1], True))
        best = cuts[np.argmax(f1[cuts])]
        below = p_sorted[best + 1] if best + 1 < len(p) else 0.0
        thresholds.append(float((p_sorted[best] + below) / 2))
    return thresholds


def multilabel_scores(probs: np.ndarray, targets: np.ndarray, thresholds: list[float], classes: list[str]) -> dict:
    """mAP, macro and micro F1 at `thresholds`, and per label its AP, F1, precision, recall and images."""
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    y = (targets > 0.5).astype(np.int64)
    decided = (probs >= np.asarray(thresholds)[None, :]).astype(np.int64)
    per_label, aps = {}, []
    for k, name in enumerate(classes):
        positives = int(y[:, k].sum())
        ap = float(average_precision_score(y[:, k], probs[:, k])) if positives else None
        if ap is not None:
            aps.append(ap)
        per_label[name] = {
            "ap": None if ap is None else round(ap, 4),
            "f1": round(float(f1_score(y[:, k], decided[:, k], zero_division=0)), 4),
            "precision": round(float(precision_score(y[:, k], decided[:, k], zero_division=0)), 4),
            "recall": round(float(recall_score(y[:, k], decided[:, k], zero_division=0)), 4),
            "threshold": round(float(thresholds[k]), 4), "images": positives}
    present = y.sum(0) > 0
    return {"map": float(np.mean(aps)) if aps else None,
            "f1_macro": float(f1_score(y[:, present], decided[:, present], average="macro", zero_division=0)),
            "f1_micro": float(f1_score(y, decided, average="micro", zero_division=0)),
            "label_frequency": float(y.mean()), "per_label": per_label}


def regression_scores(predicted: np.ndarray, targets: np.ndarray) -> dict:
    """MAE, RMSE and R^2 of `predicted` against `targets` (1-D), and the MAE of predicting their mean, to compare."""
    predicted, targets = predicted.astype(np.float64).reshape(-1), targets.astype(np.float64).reshape(-1)
    error = predicted - targets
    spread = float(((targets - targets.mean()) ** 2).sum())
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "r2": float(1 - (error ** 2).sum() / spread) if spread > 0 else None,
            "mae_of_the_mean": float(np.abs(targets - targets.mean()).mean())}
