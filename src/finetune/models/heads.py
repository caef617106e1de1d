"""Classification heads on pooled backbone features (the pooling itself is timm's, inside the backbone)."""

from __future__ import annotations

import torch.nn as nn


def _zero_init(linear: nn.Linear) -> nn.Linear:
    # Zero logits at the start: the loss starts at log(num_classes) instead of timm-style large random logits,
    # which on a random-init backbone cost several epochs to undo.
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class LinearHead(nn.Sequential):
    """dropout -> linear"""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(nn.Dropout(dropout), _zero_init(nn.Linear(in_features, num_classes)))


class MLPHead(nn.Sequential):
    """dense -> ReLU -> dropout -> linear: the Dense(hidden, relu) + Dropout head of Keras transfer-learning models."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         _zero_init(nn.Linear(hidden, num_classes)))


def create_head(name: str, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.0) -> nn.Module:
    if name == "linear":
        return LinearHead(in_features, num_classes, dropout)
    if name == "mlp":
        return MLPHead(in_features, num_classes, hidden, dropout)
    raise ValueError(f"unknown head {name!r}: linear or mlp")
