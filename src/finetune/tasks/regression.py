"""task=regression: a number per image. One output, the target standardised by the training split's mean and
standard deviation (stored in the checkpoint, undone inside the model and the exported graph); MSE or Huber loss;
MAE, RMSE and R^2 in the target's units. The head is unbounded: far outside the training range its values are
extrapolations."""

from __future__ import annotations

from finetune.tasks.base import Task


class Regression(Task):
    def read_cell(self, label, column, where, names=None, sep=None):
        from finetune.tasks.labels import is_number
        from finetune.tasks.multiclass import is_missing

        if isinstance(label, str):
            label = label.strip()
        if is_missing(label):
            return None, f"no target in column {column!r}"
        if not is_number(label):
            return None, f"target {label!r} in column {column!r} is not a number"
        return float(label), None

    def encode(self, values, column, splits, root):
        import numpy as np

        from finetune.tasks.labels import quantile_strata

        targets = np.array(values, dtype=np.float32)
        return [column], quantile_strata(targets), targets

    def label_text(self, source, j):
        from finetune.tasks.labels import written

        return written(float(source.targets[j]))

    def describe(self, source):
        return "a target to regress"

    def check_read(self, source, where):
        import numpy as np

        from finetune.errors import DataError

        if len(np.unique(source.targets)) < 2:
            found = f"only the value {source.targets[0]:g}" if len(source) else "no images with a target"
            raise DataError(f"{where}: found {found} in column {source.classes[0]!r}; a regression needs targets that "
                            "differ")

    def counts(self, source, indices):
        return [len(indices)]

    def count_table(self, source, split_indices):
        lines = [f"  {'split':<6} {'images':>7} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"]
        for s, indices in split_indices.items():
            v = source.targets[indices]
            if len(v):
                lines.append(f"  {s:<6} {len(v):>7} {v.mean():>10.4g} {v.std():>10.4g} {v.min():>10.4g} "
                             f"{v.max():>10.4g}")
        return f"  target {source.classes[0]!r}\n" + "\n".join(lines)

    def markdown_counts(self, source, split_indices):
        return "```\n" + self.count_table(source, split_indices) + "\n```"

    def target_stats(self, data) -> dict | None:
        return data.target_stats()

    def head_width(self, classes, binary):
        return 1

    def criterion(self, loss, class_weights, label_smoothing):
        import torch.nn as nn

        return nn.HuberLoss() if loss == "huber" else nn.MSELoss()

    def loss(self, criterion, logits, targets, model):
        return criterion(logits.squeeze(1).float(), (targets.float() - model.target_mean) / model.target_std)

    def metrics(self, classes):
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

        made = {f"{stage}_mae": MeanAbsoluteError() for stage in ("train", "val", "test")}  # in the target's units
        for stage in ("val", "test"):
            made[f"{stage}_rmse"] = MeanSquaredError(squared=False)
            made[f"{stage}_r2"] = R2Score()
        return made

    def stage_metrics(self, stage, classes):
        return [f"{stage}_loss", f"{stage}_mae"] + ([f"{stage}_rmse", f"{stage}_r2"] if stage != "train" else [])

    def update(self, metric, logits, targets, model) -> None:
        metric.update(model.outputs(logits.detach()).squeeze(1), targets.float())

    def outputs(self, logits, temperature=1.0, mean=0.0, std=1.0):
        return logits * std + mean

    def target_scale(self, model) -> tuple[float, float] | None:
        return model.target_std, model.target_mean

    def target_text(self, classes, target):
        return f"{float(target):.4g}"

    def draw_validation(self, callback, trainer, model):
        callback.value_views(trainer, model)

    def evaluate(self, report):
        return report.values()

    def score(self, outputs, labels, thresholds, classes):
        import numpy as np

        return float(np.abs(outputs.reshape(-1) - labels.reshape(-1)).mean()), None

    def drop(self, reference, exported):
        """The MAE's rise in percent of PyTorch's."""
        return 100 * (exported - reference) / reference if reference > 0 else 0.0

    def how_far(self, drop):
        return f"has a MAE {drop:.2f}% above PyTorch's"

    def scale(self, model):
        """Values in the target's units, where float32 rounding alone is about 1e-7 of their size: the target's mean's
        size or its spread, at least 1."""
        return max(1.0, abs(model.target_mean), model.target_std)

    def decide(self, outputs, classes, thresholds, top_k):
        return [(classes[0], float(outputs[0]))]

    def label_of(self, decided):
        return decided[0][1]

    def value_of(self, decided):
        return decided[0][1]

    def probabilities_of(self, outputs, classes):
        return None

    def said(self, decided):
        return ", ".join(f"{name} {value:.6g}" for name, value in decided)

    def json_row(self, path, decided, outputs, classes):
        return {"path": path, **dict(decided)}

    def csv_header(self, classes):
        return ["path", classes[0]]

    def csv_rows(self, path, decided):
        return [(path, f"{value:.6g}") for _, value in decided]

    def describe_output(self, description, model):
        description["output"] = {"name": "values", "dtype": "float32", "shape": ["batch", 1],
                                 "target": model.classes[0]}
        description["inside_the_model"] = {"normalise": description["inside_the_model"]["normalise"],
                                           "softmax": False,
                                           "target_scale": {"mean": model.target_mean, "std": model.target_std}}
        return description

    def read_sidecar(self, meta):
        return [meta["output"]["target"]], None, True

    def output_words(self, model):
        return f"{model.classes[0]} in its units (`values`)"

    def card(self, classes):
        return {"what": f"An image regressor of `{classes[0]}`",
                "limits": "It predicts within the range of the targets it was trained on; far outside it, its "
                          "values\n  are extrapolations nobody measured.",
                "noun": "regressor", "verb": "predicted", "figures": "figures were"}


REGRESSION = Regression("regression", "val/mae", "min", ("mse", "huber"), ("test/mae", "test/rmse", "test/r2"),
                        "a number per image", "MAE", "target", output_name="values")
