"""task=multiclass: one class per image. Softmax over the classes (of logits / T, the temperature fitted after
training), cross-entropy, accuracy and balanced accuracy; the class checks, class weights and mixing are its own."""

from __future__ import annotations

from finetune.tasks.base import Task, listing


class Multiclass(Task):
    def refused(self, cfg) -> list[tuple[str, str]]:
        return []

    def read_cell(self, label, column, where, names=None, sep=None):
        from finetune.errors import DataError
        from finetune.tasks.labels import is_number, is_whole, label_name

        if isinstance(label, str):
            label = label.strip()
        if is_missing(label) or (names is not None and label == -1):  # -1: a ClassLabel's "no label"
            return None, f"no label in column {column!r}"
        if not isinstance(label, (str, int, float)):
            raise DataError(f"{where}: the label in column {column!r} is {label!r}: one class name or number per "
                            "image (several labels per image: task=multilabel)")
        if names is not None:
            if not (is_number(label) and is_whole(label) and 0 <= int(label) < len(names)):
                raise DataError(f"{where}: label {label} in column {column!r} is not one of its ClassLabel's "
                                f"{len(names)} classes (0 to {len(names) - 1})")
            return names[int(label)], None
        if is_number(label) and not is_whole(label):
            raise DataError(f"{where}: label {label} in column {column!r} is not a whole number: class numbers are "
                            "whole (a number to regress: dataset.target_column, or task=regression)")
        return label_name(label), None

    def parts(self, value) -> tuple:
        return (value,)

    def encode(self, values, column, splits, root):
        import numpy as np

        from finetune.tasks.labels import class_order, warn_classes_missing_from_train

        classes = class_order(values)
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[name] for name in values]
        if splits is not None:
            warn_classes_missing_from_train(classes, labels, splits, root)
        return classes, np.array(labels, dtype=np.int64), None

    def label_text(self, source, j):
        return source.classes[source.labels[j]]

    def counts(self, source, indices):
        import numpy as np

        return np.bincount(source.labels[indices], minlength=len(source.classes)).tolist()

    def criterion(self, loss, class_weights, label_smoothing):
        import torch
        import torch.nn as nn

        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def loss(self, criterion, logits, targets, model):
        return criterion(logits, targets)  # class indices, or the soft targets of a mixed batch

    def metrics(self, classes):
        from torchmetrics.classification import MulticlassAccuracy

        # validate_args=False: the input checks read values on the host, a GPU sync on every update
        k = len(classes)
        metric = {"num_classes": k, "validate_args": False}
        made = {f"{stage}_acc": MulticlassAccuracy(**metric, average="micro") for stage in ("train", "val", "test")}
        for stage in ("val", "test"):  # mean recall over classes: what accuracy hides on imbalanced data
            made[f"{stage}_balanced_acc"] = MulticlassAccuracy(**metric, average="macro")
            if k > 5:
                made[f"{stage}_acc_top5"] = MulticlassAccuracy(**metric, top_k=5, average="micro")
        return made

    def stage_metrics(self, stage, classes):
        names = [f"{stage}_loss", f"{stage}_acc"]
        if stage != "train":
            names.append(f"{stage}_balanced_acc")
            if len(classes) > 5:
                names.append(f"{stage}_acc_top5")
        return names

    def update(self, metric, logits, targets, model) -> None:
        metric.update(logits, targets)

    def mixer(self, classes, mix):
        from torchvision.transforms import v2

        k = len(classes)
        mixers = [cls(alpha=alpha, num_classes=k) for cls, alpha in
                  ((v2.MixUp, (mix or {}).get("mixup", 0)), (v2.CutMix, (mix or {}).get("cutmix", 0))) if alpha]
        return v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)

    def outputs(self, logits, temperature=1.0, mean=0.0, std=1.0):
        import torch

        return torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=1)

    def fit_after_training(self, fit):
        return fit.temperature()

    def test_extras(self, metrics):
        from finetune.stats import accuracy_interval

        # 95% Wilson intervals: how far the accuracies could be from the truth on sets this small
        extras = {"val/acc_best_ci95": accuracy_interval(metrics.get("val/acc_best"), metrics["val_images"])}
        if "test/acc" in metrics:
            extras["test/acc_ci95"] = accuracy_interval(metrics["test/acc"], metrics["test_images"])
        return extras

    def logged_test(self):
        return ("test/acc",)

    def test_line(self, metrics):
        return f"Test accuracy {metrics['test/acc']:.4f} (best checkpoint)" if "test/acc" in metrics else None

    def target_text(self, classes, target):
        return classes[int(target)]

    def draw_validation(self, callback, trainer, model):
        callback.class_views(trainer, model)

    def evaluate(self, report):
        return report.classes()

    def align(self, source, classes, dataset):
        import numpy as np

        self.refuse_unknown(source, classes, dataset)
        source.labels = np.array([classes.index(source.classes[y]) for y in source.labels], dtype=np.int64)
        source.classes = list(classes)
        return source

    def score(self, outputs, labels, thresholds, classes):
        return float((outputs.argmax(1) == labels).mean()), outputs.argmax(1)

    def decide(self, outputs, classes, thresholds, top_k):
        import numpy as np

        return [(classes[c], float(outputs[c])) for c in np.argsort(-outputs)[:top_k]]

    def label_of(self, decided):
        return decided[0][0] if decided else None

    def json_row(self, path, decided, outputs, classes):
        return {"path": path, "predictions": [{"class": c, "probability": p} for c, p in decided]}

    def csv_header(self, classes):
        return ["path", "rank", "class", "probability"]

    def csv_rows(self, path, decided):
        return [(path, rank, c, f"{p:.6f}") for rank, (c, p) in enumerate(decided, start=1)]

    def read_sidecar(self, meta):
        softmax = bool(meta.get("inside_the_model", {}).get("softmax", True))
        return list(meta["output"]["classes"]), None, softmax

    def output_words(self, model):
        return f"probabilities over {len(model.classes)} classes (`probabilities`)"

    def card(self, classes):
        return {"what": f"An image classifier for {len(classes)} classes ({listing(classes)})",
                "limits": f"It knows only these {len(classes)} classes: any other image (another animal, an empty "
                          "room, a drawing) is still\n  given one of them, often with high confidence.",
                "noun": "classifier", "verb": "classified", "figures": "accuracy was"}

    def card_metrics(self):
        return ("test/acc", "test/loss", "test/balanced_acc", "test/acc_top5", "val/acc_best", "val/temperature",
                "test/nll_before", "test/nll_after", "test/ece_before", "test/ece_after")


def is_missing(label) -> bool:
    """A cell without a label: nothing, an empty text, NaN, an empty list."""
    import math

    return label is None or (isinstance(label, str) and not label.strip()) or \
        (isinstance(label, float) and math.isnan(label)) or (isinstance(label, (list, tuple)) and not label)


MULTICLASS = Multiclass("multiclass", "val/acc", "max", ("cross_entropy",), ("test/acc", "test/balanced_acc"),
                        "one class per image", "accuracy", "class", one_class_per_image=True)
