"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation split, probabilities softmax(z / T).

Fine-tuned networks are over-confident: a softmax of 0.99 is right less than 99% of the time. Dividing the logits
by one T > 1, fitted by LBFGS on the validation NLL, makes the probabilities honest without changing any
prediction (the arg max is the same).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BINS = 15
LIMITS = (0.05, 20.0)  # a T outside these says the validation set is too small or degenerate to fit one
# A temperature fitted on fewer images, or fewer errors, than these follows those few images, not the model: seen
# here, T=0.19 on 6 validation images and T=0.05 on 8 each made the test split's NLL and ECE worse.
MIN_IMAGES = 30
MIN_ERRORS = 3


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The T that minimises the NLL of softmax(logits / T) on (logits, labels): LBFGS on log T. 1 where
    why_not_fitted() gives a reason (too few images or errors, one class): there a fit follows the few images (with
    no error at all the NLL only falls as T goes to 0, one-hot probabilities that no unseen image would bear out)."""
    logits, labels = logits.detach().double(), labels.long()
    if why_not_fitted(logits, labels):
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, LIMITS[0]), LIMITS[1]) if math.isfinite(t) else 1.0


def too_few(images: int) -> str | None:
    """Why no temperature can be fitted on `images` validation images, before looking at them; None if enough."""
    if images < MIN_IMAGES:
        return (f"the validation split has {images} images, fewer than the {MIN_IMAGES} a temperature needs (give it "
                f"more: dataset.val_fraction)")
    return None


def why_not_fitted(logits: torch.Tensor, labels: torch.Tensor) -> str | None:
    """Why no temperature should be fitted on these validation logits, as the end of a sentence; None where one can."""
    images, errors = len(labels), int((logits.argmax(1) != labels).sum())
    if too_few(images):
        return too_few(images)
    if len(set(labels.tolist())) < 2:
        return "the validation images are all of one class"
    if errors == 0:
        return (f"every one of the {images} validation images is classified right (the NLL would only fall as T goes "
                f"to 0)")
    if errors < MIN_ERRORS:
        return f"only {errors} of the {images} validation images are wrong, fewer than the {MIN_ERRORS} a fit needs"
    return None


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities floored at 1e-15)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)).mean()) + 0.0  # not -0.0


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by its share."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(labels).long(),
                                              num_classes=probs.shape[1], n_bins=bins, norm="l1"))


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): probabilities at temperature T from those at temperature 1 (exact: log p = z - c)."""
    logits = np.log(np.clip(probs.astype(np.float64), 1e-300, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty equal-width confidence bin."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            out.append((float(confidence[inside].mean()), float((predicted[inside] == labels[inside]).mean()),
                        int(inside.sum())))
    return out


def reliability_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float):
    """Two reliability diagrams side by side: accuracy against confidence per bin, before and after scaling."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.6))  # not pyplot's: nothing is kept in a global registry
    axes = figure.subplots(1, 2, sharey=True)
    for ax, probs, title in ((axes[0], before, "before (T = 1)"), (axes[1], after, f"after (T = {temperature:.2f})")):
        rows = reliability(probs, labels)
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ax.bar([c for c, _, _ in rows], [a for _, a, _ in rows], width=1 / BINS, alpha=0.7, edgecolor="black")
        ax.set_title(f"{title}: ECE {ece(probs, labels):.3f}, NLL {nll(probs, labels):.3f}")
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    figure.tight_layout()
    return figure
