"""What every task (finetune.tasks) says about itself, and what the three share. A task is an object from the moment
it is known (task=, or what a reader inferred from the data) to the end of the run; files store its name, which
task_of reads back.

Front half: numpy, torch and torchmetrics are imported inside the methods that need them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, repr=False)
class Task:
    name: str
    monitor: str  # the validation metric that picks the best checkpoint, ends phases early and stops early
    mode: str  # max | min: which way the monitored metric improves
    losses: tuple[str, ...]  # head.loss: the first is the default
    headline: tuple[str, ...]  # the test figures the log, the model card and the sweep summary show, in order
    reads: str  # what the labels are, for messages
    figure: str  # the headline figure's name in words: the model card's, the export's measurement
    noun: str  # what one image's label is called in tables and messages: class, label, target
    one_class_per_image: bool = False  # the class checks, class weights, mixing and Kaggle's format are for it
    output_name: str = "probabilities"  # the exported graph's output

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"task_of({self.name!r})"

    # --- the keys only one task can use --------------------------------------------------------------------------

    def refused(self, cfg: Any) -> list[tuple[str, str]]:
        """(key=value, why) for each key given in `cfg` that this task cannot use."""
        given = [(f"augment.{key}={cfg.augment[key]}", "mixes labels of one class per image")
                 for key in ("mixup", "cutmix") if cfg.augment.get(key)]
        if cfg.dataset.get("balance") not in (None, "none"):
            given.append((f"dataset.balance={cfg.dataset.balance}", "evens out classes"))
        if cfg.schedule.get("label_smoothing"):
            given.append((f"schedule.label_smoothing={cfg.schedule.label_smoothing}", "smooths one class per image"))
        if cfg.head.get("binary"):
            given.append(("head.binary=true", "is one output for two classes"))
        return given

    # --- reading labels -----------------------------------------------------------------------------------------

    def read_cell(self, label, column: str, where: str, names: list[str] | None = None,
                  sep: str | None = None) -> tuple[Any, str | None]:
        """One table cell or dataset row's label as this task reads it: (value, None), or (None, why) for a row to
        pass over; a DataError for a label no row of this task can hold. `names`: a ClassLabel's names, which
        whole-number labels index; `sep`: what separates several labels in a text cell."""
        raise NotImplementedError

    def parts(self, value) -> tuple:
        """The class names in a label as read (read_cell): none for a number to regress."""
        return ()

    def encode(self, values: list, column: str, splits: list[str] | None, root: str | None) -> tuple:
        """(classes, labels, targets) of samples whose labels read_cell gave as `values`: the class names (the
        target's column, for a number), each sample's class or stratum, and the 0/1 rows or numbers (None for one
        class per image)."""
        raise NotImplementedError

    def label_text(self, source, j: int) -> str:
        """Sample j's label as split.csv and the reports write it."""
        raise NotImplementedError

    @property
    def plural(self) -> str:
        """The noun of many: classes, labels, targets."""
        return f"{self.noun}{'es' if self.noun.endswith('s') else 's'}"

    @property
    def one_label(self) -> str:
        """What one image's whole label is called: a class, a set of labels, a target."""
        return self.noun

    def describe(self, source) -> str:
        """What a dataset's labels are, in the log's words: 3 classes, 5 labels, a target to regress."""
        return f"{len(source.classes)} {self.plural}"

    def check_read(self, source, where: str) -> None:
        """A DataError for a dataset this task cannot learn from (one class; one value of the target)."""
        import numpy as np

        from finetune.errors import DataError

        counts = self.counts(source, np.arange(len(source)))
        present = [c for c, n in zip(source.classes, counts) if n > 0]
        if len(present) < 2 and self.one_class_per_image or not present:
            found = f"only class {present[0]!r}" if present else "no labelled images"
            raise DataError(f"{where}: found {found}; a classifier needs at least two classes")

    def counts(self, source, indices) -> list[int]:
        """Images per class (with each label; all of them, for a number) among samples `indices`."""
        raise NotImplementedError

    def count_table(self, source, split_indices: dict) -> str:
        """Images per class (per label) in each split, as the log shows them."""
        counts = {s: self.counts(source, indices) for s, indices in split_indices.items()}
        width = max(len(c) for c in source.classes + [self.noun])
        lines = [f"  {self.noun:<{width}}  " + " ".join(f"{s:>7}" for s in split_indices)]
        for i, name in enumerate(source.classes):
            lines.append(f"  {name:<{width}}  " + " ".join(f"{counts[s][i]:>7}" for s in split_indices))
        return "\n".join(lines)

    def markdown_counts(self, source, split_indices: dict) -> str:
        """count_table as a Markdown table (TensorBoard's TEXT tab)."""
        counts = {s: self.counts(source, indices) for s, indices in split_indices.items()}
        rows = [f"| {self.noun} | {' | '.join(split_indices)} |", "|---|" + "---:|" * len(split_indices)]
        rows += [f"| {name} | " + " | ".join(str(counts[s][i]) for s in split_indices) + " |"
                 for i, name in enumerate(source.classes)]
        return "\n".join(rows)

    def stratify(self, source):
        """What the split keeps in proportion besides source.labels: a multi-label's 0/1 rows, or None."""
        return None

    def target_stats(self, data) -> dict | None:
        """What the model standardises its target by (the training split's mean and std), or None."""
        return None

    # --- the model ----------------------------------------------------------------------------------------------

    def head_width(self, classes: list[str], binary: bool) -> int:
        return 1 if binary else len(classes)

    def criterion(self, loss: str | None, class_weights: list[float] | None, label_smoothing: float):
        """head.loss (None: the task's own) as a torch loss."""
        raise NotImplementedError

    def loss(self, criterion, logits, targets, model):
        """The training loss of a batch: `model` holds the target's scale for regression."""
        return criterion(logits.float(), targets.float())

    def metrics(self, classes: list[str]) -> dict:
        """The torchmetrics the model holds, by attribute name (val_map, test_mae, ...)."""
        raise NotImplementedError

    def stage_metrics(self, stage: str, classes: list[str]) -> list[str]:
        """The names of `stage`'s metrics (train, val, test), its loss first."""
        raise NotImplementedError

    def update(self, metric, logits, targets, model) -> None:
        """Feed one batch to a metric of this task, as that metric reads it."""
        raise NotImplementedError

    def mixer(self, classes: list[str], mix: dict | None):
        """augment.mixup / cutmix as a transform of (images, labels), or None."""
        return None

    def outputs(self, logits, temperature: float = 1.0, mean: float = 0.0, std: float = 1.0):
        """What the model says, from its logits: the one definition the model, the exported graph and the metrics
        use (probabilities over classes or per label; the value in the target's units)."""
        raise NotImplementedError

    # --- after training ---------------------------------------------------------------------------------------

    def fit_after_training(self, fit) -> dict:
        """What is fitted on the validation split after training and stored in best.ckpt (a temperature,
        thresholds, nothing), asked of `fit` (finetune.training.AfterTraining), and its figures for metrics.json."""
        return {}

    def test_extras(self, metrics: dict) -> dict:
        """Figures the test adds to metrics.json besides the logged ones."""
        return {}

    def logged_test(self) -> tuple[str, ...]:
        """The test figures logged during the test step (TensorBoard's HPARAMS tab compares them)."""
        return self.headline

    def test_line(self, metrics: dict) -> str | None:
        """The run's last line's figures, or None where it has none."""
        figures = [f"{key} {metrics[key]:.4f}" for key in self.headline if metrics.get(key) is not None]
        return f"Test (best checkpoint): {'  '.join(figures)}" if figures else None

    # --- showing it -------------------------------------------------------------------------------------------

    def target_text(self, classes: list[str], target) -> str:
        """A training image's target (a tensor) as its grid's title."""
        raise NotImplementedError

    def draw_validation(self, callback, trainer, model) -> None:
        """The dashboards' validation views of this task (finetune.callbacks.dashboards)."""
        raise NotImplementedError

    # --- judging outputs: evaluate, the export's measurement -------------------------------------------------

    def evaluate(self, report) -> tuple[dict, str]:
        """evaluate's figures, files and summary line for the outputs in `report` (finetune.evaluate.Report), which
        this task asks for its own (report.classes, labels, values)."""
        raise NotImplementedError

    def align(self, source, classes: list[str], dataset: str):
        """A dataset read for evaluation, its labels as the model's (in the model's order); a DataError for a class
        the model does not know."""
        return source

    def refuse_unknown(self, source, classes: list[str], dataset: str) -> None:
        """A DataError naming the classes (labels) of a dataset read for evaluation that the model does not know."""
        from finetune.errors import DataError

        unknown = [c for c in source.classes if c not in classes]
        if unknown:
            raise DataError(f"dataset={dataset} has {self.plural} the model does not know: {', '.join(unknown[:5])} "
                            f"(the model's: {listing(classes)})")

    def score(self, outputs, labels, thresholds: list[float], classes: list[str]):
        """A model's figure on a split (accuracy, mAP or MAE) from its outputs as numpy, and its decisions (to count
        how many another model changes; None where it makes none)."""
        raise NotImplementedError

    def drop(self, reference: float, exported: float) -> float:
        """How far an export falls below PyTorch, in points of the figure."""
        return 100 * (reference - exported)

    def how_far(self, drop: float) -> str:
        return f"is {drop:.2f} {self.figure} points below PyTorch's"

    def target_scale(self, model) -> tuple[float, float] | None:
        """(std, mean) that the exported graph's last nodes scale its output by, or None."""
        return None

    def scale(self, model) -> float:
        """The size of the model's outputs, which a parity tolerance is relative to."""
        return 1.0

    # --- predictions --------------------------------------------------------------------------------------------

    def decide(self, outputs, classes: list[str], thresholds: list[float] | None, top_k: int) -> list:
        """One image's prediction from its outputs (numpy): [(name, probability or value)], best first."""
        raise NotImplementedError

    def label_of(self, decided: list):
        """A prediction's label (finetune.load(...).predict): the top class, the labels present, or the value."""
        raise NotImplementedError

    def value_of(self, decided: list) -> float | None:
        """A prediction's value, for a task that predicts a number; None otherwise."""
        return None

    def probabilities_of(self, outputs, classes: list[str]) -> dict[str, float] | None:
        """One image's probability per class or label, by name; None where the outputs are no probabilities."""
        return {name: float(p) for name, p in zip(classes, outputs)}

    def said(self, decided: list) -> str:
        """A prediction as predict prints it."""
        return ", ".join(f"{name} {p:.4f}" for name, p in decided)

    def json_row(self, path: str, decided: list, outputs, classes: list[str]) -> dict:
        raise NotImplementedError

    def csv_header(self, classes: list[str]) -> list[str]:
        raise NotImplementedError

    def csv_rows(self, path: str, decided: list) -> list[tuple]:
        raise NotImplementedError

    # --- the export's sidecar and card ------------------------------------------------------------------------

    def describe_output(self, description: dict, model) -> dict:
        """The export sidecar's output and what is inside the graph, for this task."""
        return description

    def read_sidecar(self, meta: dict) -> tuple[list[str], list[float] | None, bool]:
        """An export sidecar's classes, thresholds and whether the graph ends in probabilities."""
        return list(meta["output"]["classes"]), None, True

    def output_words(self, model) -> str:
        """The export card's line on the output."""
        raise NotImplementedError

    def card(self, classes: list[str]) -> dict:
        """The model card's words: what (the model in a phrase), limits, noun (classifier), verb (classified)."""
        raise NotImplementedError

    def card_metrics(self) -> tuple[str, ...]:
        """The figures of metrics.json the model card tabulates."""
        return (*self.headline, "test/loss", f"{self.monitor}_best", "test/label_frequency")


def listing(classes: list[str], limit: int = 10) -> str:
    """The first `limit` names, then ', ...'."""
    return f"{', '.join(classes[:limit])}{', ...' if len(classes) > limit else ''}"
