"""task=multilabel: any number of labels per image. A sigmoid per label, binary cross-entropy, mAP (no threshold
needed); after training each label's threshold is fitted on the validation split (its best F1) and stored in
best.ckpt, where predict, evaluate and the export decide labels by it."""

from __future__ import annotations

from finetune.tasks.base import Task, listing


class Multilabel(Task):
    def read_cell(self, label, column, where, names=None, sep=None):
        from finetune.errors import DataError
        from finetune.tasks.labels import label_name

        if isinstance(label, (list, tuple)):
            parts = list(label)
        elif isinstance(label, str):
            parts = label.split(sep) if sep else [label]
        else:
            parts = [] if label is None or (isinstance(label, float) and label != label) else [label]
        parts = [v for v in parts if v is not None and str(v).strip()]
        if names is not None:
            wrong = [v for v in parts if not 0 <= v < len(names)]
            if wrong:
                raise DataError(f"{where}: label {wrong[0]} in column {column!r} is not one of its ClassLabel's "
                                f"{len(names)} classes (0 to {len(names) - 1})")
            parts = [names[v] for v in parts]
        value = tuple(sorted({label_name(v) for v in parts}))
        return (value, None) if value else (None, f"no label in column {column!r}")

    @property
    def one_label(self) -> str:
        return "set of labels"

    def parts(self, value) -> tuple:
        return value

    def encode(self, values, column, splits, root):
        import numpy as np

        from finetune.tasks.labels import class_order, rarest_label

        classes = class_order(name for names in values for name in names)
        index = {name: i for i, name in enumerate(classes)}
        targets = np.zeros((len(values), len(classes)), dtype=np.float32)
        for j, names in enumerate(values):
            targets[j, [index[name] for name in names]] = 1
        return classes, rarest_label(targets), targets

    def label_text(self, source, j):
        from finetune.tasks.labels import written

        return written(tuple(name for name, on in zip(source.classes, source.targets[j]) if on))

    def counts(self, source, indices):
        return source.targets[indices].sum(0).astype(int).tolist()

    def stratify(self, source):
        return source.targets

    def head_width(self, classes, binary):
        return len(classes)

    def criterion(self, loss, class_weights, label_smoothing):
        import torch.nn as nn

        return nn.BCEWithLogitsLoss()

    def metrics(self, classes):
        from finetune.models.metrics import LabelMeanAP

        return {f"{stage}_map": LabelMeanAP(len(classes)) for stage in ("val", "test")}  # needs no threshold

    def stage_metrics(self, stage, classes):
        return [f"{stage}_loss"] + ([f"{stage}_map"] if stage != "train" else [])

    def update(self, metric, logits, targets, model) -> None:
        metric.update(self.outputs(logits.detach().float()), targets.long())

    def outputs(self, logits, temperature=1.0, mean=0.0, std=1.0):
        import torch

        return torch.sigmoid(logits)

    def fit_after_training(self, fit):
        return fit.thresholds()  # the thresholds predict and the export decide labels by

    def logged_test(self):
        return ("test/map",)  # F1 at the thresholds comes after the test

    def target_text(self, classes, target):
        return " ".join(name for name, on in zip(classes, target.tolist()) if on > 0.5) or "(none)"

    def draw_validation(self, callback, trainer, model):
        callback.label_views(trainer, model)

    def evaluate(self, report):
        return report.labels()

    def align(self, source, classes, dataset):
        import numpy as np

        self.refuse_unknown(source, classes, dataset)
        targets = np.zeros((len(source), len(classes)), dtype=np.float32)
        targets[:, [classes.index(c) for c in source.classes]] = source.targets
        source.targets, source.classes = targets, list(classes)
        return source

    def score(self, outputs, labels, thresholds, classes):
        import numpy as np

        from finetune.scores import multilabel_scores

        scores = multilabel_scores(outputs, labels, thresholds, classes)
        return scores["map"] or 0.0, outputs >= np.asarray(thresholds)[None, :]

    def decide(self, outputs, classes, thresholds, top_k):
        import numpy as np

        # every label whose probability reaches its threshold, most probable first
        return [(classes[c], float(outputs[c])) for c in np.argsort(-outputs) if outputs[c] >= thresholds[c]]

    def label_of(self, decided):
        return [name for name, _ in decided]

    def said(self, decided):
        return super().said(decided) or "no label over its threshold"

    def json_row(self, path, decided, outputs, classes):
        return {"path": path, "labels": [{"label": c, "probability": p} for c, p in decided],
                "probabilities": dict(zip(classes, (float(x) for x in outputs)))}

    def csv_header(self, classes):
        return ["path", "label", "probability"]

    def csv_rows(self, path, decided):  # one row per label present; an image with none has an empty one
        return [(path, c, f"{p:.6f}") for c, p in decided] or [(path, "", "")]

    def describe_output(self, description, model):
        # each label on its own: present where its probability reaches its threshold
        description["inside_the_model"] = {**description["inside_the_model"], "softmax": False, "sigmoid": True}
        description["thresholds"] = dict(zip(model.classes, model.thresholds))
        return description

    def read_sidecar(self, meta):
        classes = list(meta["output"]["classes"])
        return classes, [float(meta["thresholds"][c]) for c in classes], True

    def output_words(self, model):
        return (f"a probability per label, {len(model.classes)} labels, each present from its threshold on "
                "(`probabilities`; thresholds in the sidecar)")

    def card(self, classes):
        return {"what": f"A multi-label image classifier (any number of {len(classes)} labels per image: "
                        f"{listing(classes)})",
                "limits": f"It knows only these {len(classes)} labels, each decided at the threshold fitted on the "
                          "validation split\n  (`val/thresholds`); other things in an image are not named.",
                "noun": "classifier", "verb": "classified", "figures": "figures were"}


MULTILABEL = Multilabel("multilabel", "val/map", "max", ("bce",), ("test/map", "test/f1_macro", "test/f1_micro"),
                        "any number of labels per image", "mAP", "label")
