"""Classification heads on pooled backbone features (the pooling itself is timm's, inside the backbone): one table,
HEADS, that the config check, the ImageModule and README read. Light to import: torch loads when a head is made."""

from __future__ import annotations

from typing import Any

from finetune.errors import ConfigError

# head.name: what each head is, in Keras' words (the models our users port)
HEADS = {
    "linear": "dropout -> linear",
    "mlp": "dense(hidden) -> ReLU -> dropout -> linear: the Dense(hidden, relu) + Dropout head of Keras models",
}


def create_head(name: str, in_features: int, num_classes: int, hidden: int, dropout: float):
    """Head `name` of HEADS, as an nn.Sequential whose last layer starts at zero: the loss starts at
    log(num_classes) instead of timm-style large random logits, which on a random-init backbone cost several epochs
    to undo."""
    import torch.nn as nn

    last = nn.Linear(hidden if name == "mlp" else in_features, num_classes)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    if name == "linear":
        return nn.Sequential(nn.Dropout(dropout), last)
    if name == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), last)
    raise ConfigError(f"head.name must be one of {', '.join(HEADS)} (got {name})")


def check(h: Any) -> None:
    """The `head` config `h`, before any work; one line naming the key."""
    if h.name not in HEADS:
        raise ConfigError(f"head.name must be one of {', '.join(HEADS)} (got {h.name})")
    if not 0 <= h.dropout < 1:
        raise ConfigError(f"head.dropout must be in [0, 1) (got {h.dropout})")
    if h.hidden < 1:
        raise ConfigError(f"head.hidden must be >= 1 (got {h.hidden})")
