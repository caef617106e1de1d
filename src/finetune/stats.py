"""Confidence intervals for the accuracies a run reports: on a 65-image validation set, +-6 points is noise."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default): unlike the normal approximation it stays in
    [0, 1] and keeps its coverage for small n and for proportions near 0 or 1. None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, n: int) -> list[float] | None:
    """The 95% Wilson interval of an accuracy measured on n images, as [low, high] rounded to 4 places."""
    if accuracy is None or not math.isfinite(accuracy) or n <= 0:
        return None
    interval = wilson(round(accuracy * n), n)
    return [round(interval[0], 4), round(interval[1], 4)]


def overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]
