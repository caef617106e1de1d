"""The figures evaluate writes as PNGs and the dashboards send to TensorBoard: matplotlib Figures, no pyplot state."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure


def _tick_size(n: int) -> float:
    return max(4.0, min(10.0, 240.0 / max(n, 1)))


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str], title: str = "Confusion matrix") -> Figure:
    """Counts (left) and each true class's row normalised to 1 (right), class names on both axes."""
    k = len(classes)
    side = min(4 + 0.45 * k, 30)
    fig = Figure(figsize=(2 * side + 1, side), layout="constrained")
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    for ax, data, name, fmt in ((fig.add_subplot(1, 2, 1), matrix, "counts", "d"),
                                (fig.add_subplot(1, 2, 2), normalised, "normalised by true class", ".2f")):
        image = ax.imshow(data, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(f"{title} ({name})")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ticks = np.arange(k)
        ax.set_xticks(ticks, classes, rotation=90, fontsize=_tick_size(k))
        ax.set_yticks(ticks, classes, fontsize=_tick_size(k))
        if k <= 20:
            peak = data.max() if data.size else 0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=_tick_size(k),
                            color="white" if peak and data[i, j] > peak / 2 else "black")
    return fig


def curves_figure(history: dict[str, dict[int, float]], title: str = "Training curves", metric: str = "acc") -> Figure:
    """Loss and accuracy (or `metric`: map, mae) per epoch, train and val, from a run's logs
    ({metric: {epoch: value}})."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    names = {"loss": "loss", "acc": "accuracy", "map": "mAP", "mae": "MAE"}
    for i, kind in enumerate(("loss", metric)):
        ax = fig.add_subplot(1, 2, i + 1)
        for stage in ("train", "val"):
            series = history.get(f"{stage}/{kind}", {})
            if series:
                epochs = sorted(series)
                ax.plot([e + 1 for e in epochs], [series[e] for e in epochs], marker="o", label=stage)
        ax.set_title(f"{title}: {names[kind]}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(names[kind])
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def image_grid_figure(images: list[np.ndarray], titles: list[str], colours: list[str] | None = None,
                      title: str = "") -> Figure:
    """Images (H, W, 3 uint8) in a grid, each with its title (and title colour)."""
    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows + (0.4 if title else 0)), layout="constrained")
    if title:
        fig.suptitle(title)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image)
        ax.set_title(titles[i], fontsize=8, color=(colours[i] if colours else "black"))
        ax.axis("off")
    return fig


def per_class_figure(precision: np.ndarray, recall: np.ndarray, classes: list[str],
                     title: str = "Per-class precision and recall") -> Figure:
    k = len(classes)
    fig = Figure(figsize=(max(6, 0.35 * k + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(k)
    ax.bar(x - 0.2, precision, width=0.4, label="precision")
    ax.bar(x + 0.2, recall, width=0.4, label="recall")
    ax.set_xticks(x, classes, rotation=90, fontsize=_tick_size(k))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    return fig


def figure_to_array(figure: Figure, dpi: int = 90) -> np.ndarray:
    """The figure rendered to an RGB array (H, W, 3), without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def precision_recall_figure(probs: np.ndarray, targets: np.ndarray, classes: list[str],
                            thresholds: list[float]) -> Figure:
    """A multi-label model's precision-recall curve per label (at most 30), each with its AP and the point of its
    fitted threshold."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for k, name in list(enumerate(classes))[:30]:
        y = targets[:, k] > 0.5
        if not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, probs[:, k])
        line, = ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(y, probs[:, k]):.3f})")
        decided = probs[:, k] >= thresholds[k]
        if decided.any():
            ax.plot([(decided & y).sum() / y.sum()], [(decided & y).sum() / decided.sum()], "o", color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall per label (dots: the fitted thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def regression_figure(predicted: np.ndarray, targets: np.ndarray, name: str) -> Figure:
    """Predicted against true (with the line of perfect prediction), and the residuals against the prediction."""
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(targets, predicted, s=12, alpha=0.7)
    low, high = float(min(targets.min(), predicted.min())), float(max(targets.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", label="predicted = true")
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.set_title("Predicted against true")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    ax.scatter(predicted, predicted - targets, s=12, alpha=0.7)
    ax.axhline(0, color="grey", linestyle="--")
    ax.set_xlabel(f"predicted {name}")
    ax.set_ylabel("residual (predicted - true)")
    ax.set_title("Residuals")
    ax.grid(alpha=0.3)
    return fig
