"""The torchmetrics of finetune's own: where torchmetrics' would read back from the device, or average otherwise than
evaluate and the export do."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAveragePrecision


class BatchMean(Metric):
    """The mean of per-batch values weighted by batch size, accumulated on the device without reading anything
    back (torchmetrics' MeanMetric checks every value for NaN on the host, or, told not to, drops the weights)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total += value.detach().float() * weight
        self.count += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class LabelMeanAP(MultilabelAveragePrecision):
    """mAP over the labels that have positives among the images seen (torchmetrics' macro average counts a label
    without any as AP 0): the mean that evaluate and the export (finetune.scores) report too."""

    def __init__(self, num_labels: int):
        super().__init__(num_labels=num_labels, average=None, validate_args=False)
        self.add_state("positives", torch.zeros(num_labels), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self.positives += target.sum(0).float()

    def compute(self) -> torch.Tensor:
        present = self.positives > 0
        if not present.any():
            return torch.tensor(float("nan"), device=self.positives.device)
        return super().compute()[present].mean()
