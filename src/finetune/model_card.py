"""model_card.md: what a trained model is, what it was trained and tested on, how to use it and where it stops.

Hugging Face's model-card layout: a YAML metadata header (library, tags, datasets, base model, metrics as a
model-index), then sections. Every run writes one; export copies it beside the exported model with the export's
own facts.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune import rundir

SPLIT_NAMES = ("train", "val", "test")


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {json.dumps(item)}" for item in items)


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _interval_row(interval) -> str:
    return f"| test/acc, 95% interval (Wilson) | {interval[0]:.4f} to {interval[1]:.4f} |" if interval else ""


def train_card(cfg, classes: list[str], counts: dict[str, list[int]], metrics: dict, backbone: dict,
               preprocessing: dict, parameters: int, skipped: int, run_dir: Path,
               images: dict[str, int] | None = None) -> str:
    """The card of a finished run. `counts`: images per class in each split; `backbone`: the checkpoint's record
    (name, architecture); `metrics`: metrics.json's values; `images`: images per split (for multi-label, where an
    image counts under each of its labels in `counts`)."""
    name, dataset = cfg.backbone.name, cfg.dataset.name
    pretrained = bool(cfg.backbone.pretrained) and cfg.backbone.weights is None
    base = name[len("hf-hub:"):] if name.startswith("hf-hub:") else (f"timm/{name}" if pretrained and "." in name
                                                                     else None)
    arch = backbone.get("architecture", name)
    from finetune.tasks import task_of

    task = task_of(metrics.get("task"))
    headline = task.headline[0]  # test/acc, test/map, test/mae
    metric_name = task.figure
    accuracy = metrics.get(headline)
    totals = images or {s: sum(counts.get(s, [])) for s in SPLIT_NAMES}
    held_out = totals.get("test", 0) > 0  # without a test split, no test figures: only val/acc_best
    split = "test"
    where = "the test split" if held_out else ("the validation split alone (this run has no test split, so no test "
                                               f"figures: the same images chose the best checkpoint, so "
                                               f"{task.monitor}_best is optimistic)")
    test_images = metrics.get("test_images") if held_out else metrics.get("val_images")
    header = ["---", "library_name: timm", "pipeline_tag: image-classification",
              f"tags:{_yaml_list(['image-classification', 'timm', 'finetune', 'transfer-learning'])}",
              f"datasets:{_yaml_list([dataset])}"]
    if base:
        header.append(f"base_model: {json.dumps(base)}")
    header.append(f"metrics:{_yaml_list([metric_name.lower()])}")
    if accuracy is not None:
        header += ["model-index:", f"- name: {json.dumps(f'{dataset}-{arch}')}",
                   "  results:", "  - task:", "      type: image-classification",
                   f"    dataset:\n      name: {json.dumps(dataset)}\n      type: {json.dumps(dataset)}\n"
                   f"      split: {split}", "    metrics:", f"    - type: {metric_name.lower()}",
                   f"      value: {accuracy:.4f}",
                   f"      name: {split} {metric_name} ({test_images} images, best checkpoint)"]
    header.append("---")

    width = max(len(c) for c in classes + [task.noun])
    rows = [f"| {task.noun:<{width}} | train | val | test |", f"|{'-' * (width + 2)}|------:|----:|-----:|"]
    rows += [f"| {c:<{width}} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
             for i, c in enumerate(classes)]
    rows.append(f"| {'all':<{width}} | {totals['train']} | {totals['val']} | {totals['test']} |")
    s = cfg.schedule
    phases = f"the phases of `schedule={s.name}`" if s.get("phases") else \
        f"head alone for {s.freeze_epochs} epochs, then the backbone (`unfreeze={s.unfreeze}`) at " \
        f"{s.backbone_lr_ratio} x the head's rate"
    size = preprocessing["image_size"]
    measured = [(key, metrics[key]) for key in task.card_metrics() if metrics.get(key) is not None]
    words = task.card(classes)  # what the model is, its limits, its noun and verb
    card = "\n".join(header) + f"""

# {dataset} {words['noun']}: {name}

{words['what']},
fine-tuned with finetune from a timm backbone (`task={task.name}`). Run directory: `{run_dir}`.

## Model

- Backbone: `{name}` (timm architecture `{arch}`), \
{'pretrained weights' if pretrained else 'a local weights file' if cfg.backbone.weights else 'random initialisation'}\
{f' from `{base}`' if base else ''}; {parameters / 1e6:.2f}M parameters with the head
- Head: `{cfg.head.name}` (pool `{cfg.head.pool}`, dropout {cfg.head.dropout})
- Input: RGB, resized to a short side of {int(size / preprocessing['crop_pct'])} px \
({preprocessing['interpolation']}), centre-cropped to {size}x{size}; normalised inside the model with mean \
{[round(x, 4) for x in preprocessing['mean']]} and std {[round(x, 4) for x in preprocessing['std']]}

## Training data

`dataset={dataset}` from `{cfg.dataset.root}`: {sum(totals.values())} images after the integrity scan \
({skipped} files skipped or passed over: `skipped.csv`); the split is in `split.csv` (seed {cfg.seed}).

{chr(10).join(rows)}

## Training procedure

`schedule={s.name}`: {phases}; optimizer `{s.optimizer}`, peak rate {s.lr}, weight decay {s.weight_decay}, \
{s.epochs} epochs planned, {metrics.get('epochs', 'n/a')} run ({metrics.get('global_step', 'n/a')} steps); \
augmentation `{cfg.augment.get('name', 'see config.yaml')}`; BatchNorm `{s.get('bn', 'train')}`. Every value is in \
`config.yaml`.
{_phase_table(metrics.get('phases') or [])}

## Evaluation

On {where} ({test_images} images), with the best checkpoint (`{metrics.get('best_checkpoint')}`):

| metric | value |
|---|---:|
{chr(10).join(f'| {key} | {_number(value)} |' for key, value in measured)}
{_interval_row(metrics.get('test/acc_ci95'))}

## How to use

    uv run scripts/predict.py ckpt={run_dir} inputs=photo.jpg
    uv run scripts/evaluate.py ckpt={run_dir}
    uv run scripts/export.py ckpt={run_dir} format=onnx

In Python: `finetune.models.module.load_module("{run_dir}/checkpoints/best.ckpt")` rebuilds the model
from the checkpoint alone (class names and preprocessing included).

## Limitations

- {words['limits']}
- It was trained at {size}x{size} pixels on the images of `{cfg.dataset.root}`; photos unlike them (other
  cameras, lighting, framing) may be {words['verb']} worse than the \
test figures say.
- The {'test' if held_out else 'validation'} {words['figures']} measured on {test_images} images{
    f": each image more or less right moves it by {_number(100 / max(int(test_images or 1), 1), 2)} points"
    if task.one_class_per_image else ", a small sample"}.
"""
    return card


def _phase_table(phases: list[dict]) -> str:
    """What each phase gave, as validation accuracy (metrics.json's `phases`): nothing for a one-phase run."""
    if len(phases) < 2:
        return ""
    monitor = next(key[:-4] for key in phases[0] if key.endswith("_end"))  # val/acc, val/map or val/mae
    lower = " (lower is better)" if monitor.endswith("mae") else ""
    rows = ["", f"| phase | trains | epochs | {monitor} at its end | best | on the best before it{lower} |",
            "|---|---|---|---:|---:|---:|"]
    for p in phases:
        gain = "" if p.get("gain") is None else f"{p['gain']:+.4f}"
        trains = {"head": "the head", "all": "everything"}.get(p["train"], f"head + last {p['train']} blocks")
        rows.append(f"| {p['phase']} | {trains} | {p['epochs'][0]}-{p['epochs'][1]} | {p[monitor + '_end']:.4f} | "
                    f"{p[monitor + '_best']:.4f} | {gain} |")
    return "\n".join(rows) + "\n"


def export_section(facts: dict) -> str:
    """The section export adds to a copy of the run's card: what was exported and how it measured."""
    lines = ["", "## Export", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def write_export_card(run_dir: Path, out: Path, facts: dict) -> Path:
    """RUN_DIR/model_card.md with the export's facts, beside the exported model as <name>.model_card.md."""
    card = run_dir / rundir.MODEL_CARD
    text = card.read_text() if card.is_file() else f"# {out.name}\n\n(The run's model_card.md was not found.)\n"
    path = out.with_name(f"{out.stem}.model_card.md")
    path.write_text(text + export_section(facts))
    return path
