"""finetune.load(...).predict against timm's raw forward, on the same images and batch, and the time from
finetune.load to the first prediction: what the front door costs over the model itself.

    uv run benchmarks/predict.py [backbone=mobilenetv2_100] [images=256] [batch=32] [size=224]

The checkpoint is a real finetune run (one epoch on fabricated photos-sized images, random weights: speed does not
depend on them); the images are uint8 RGB arrays of the run's input size in memory, so that neither side decodes a
file. Both sides run on the CPU with the process's threads, alternately, each keeping its best of three."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# In a fresh process: seconds from `import finetune` to the first prediction, and of them, up to the loaded model.
FIRST_PREDICTION = """
import sys, time
start = time.perf_counter()
import numpy as np
import finetune
model = finetune.load(sys.argv[1])
loaded = time.perf_counter()
size = int(sys.argv[2])
model.predict(np.zeros((size, size, 3), dtype=np.uint8), device="cpu")
print(f"{time.perf_counter() - start:.2f} {loaded - start:.2f}")
"""


def arguments() -> dict:
    given = dict(arg.split("=", 1) for arg in sys.argv[1:])
    return {"backbone": given.get("backbone", "mobilenetv2_100"), "images": int(given.get("images", 256)),
            "batch": int(given.get("batch", 32)), "size": int(given.get("size", 224))}


def fabricate(root: Path, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")


def main() -> None:
    import torch

    import finetune

    args = arguments()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fabricate(tmp / "data", args["size"])
        run = finetune.train("dataset=image_folder", f"dataset.root={tmp / 'data'}", f"backbone={args['backbone']}"
                             if (Path(finetune.api.__file__).parent / "conf" / "backbone" /
                                 f"{args['backbone']}.yaml").is_file() else f"backbone.name={args['backbone']}",
                             "backbone.pretrained=false", f"dataset.image_size={args['size']}", "schedule.epochs=1",
                             "schedule.freeze_epochs=0", "dataset.num_workers=0", "callbacks.progress_bar=false",
                             "calibrate=false", "trainer.accelerator=cpu", "logger=none", f"run_dir={tmp / 'run'}")
        start = time.perf_counter()
        model = finetune.load(run.dir)
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 255, (args["size"], args["size"], 3), dtype=np.uint8) for _ in range(args["images"])]
        model.predict(images[:1], device="cpu")
        first = time.perf_counter() - start

        net = model.net.eval()
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        x = net.normalize(batch)  # what timm's forward gets: normalised, channels-last, as finetune feeds it
        backbone, head = net.backbone, net.head

        def raw() -> None:
            with torch.inference_mode():
                for i in range(0, len(x), args["batch"]):
                    head(backbone(x[i:i + args["batch"]])).softmax(1)

        def front_door() -> None:
            model.predict(images, batch_size=args["batch"], device="cpu")

        fresh = subprocess.run([sys.executable, "-c", FIRST_PREDICTION, str(run.dir), str(args["size"])],
                               capture_output=True, text=True, check=True).stdout.split()

        best = {"timm forward": float("inf"), "Model.predict": float("inf")}
        for _ in range(3):
            for name, call in (("timm forward", raw), ("Model.predict", front_door)):
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: args["images"] / seconds for name, seconds in best.items()}
    print(f"{args['backbone']} at {args['size']} px, batch {args['batch']}, {args['images']} images in memory, CPU "
          f"({torch.get_num_threads()} threads):")
    for name, rate in rates.items():
        print(f"  {name:<14} {rate:8.1f} images/s")
    print(f"  Model.predict / timm forward: {rates['Model.predict'] / rates['timm forward']:.2f}")
    print(f"  finetune.load to the first prediction: {first:.2f} s in a process that has trained; {fresh[0]} s in a "
          f"fresh one, `import finetune` included ({fresh[1]} s of it to import torch and load the checkpoint)")


if __name__ == "__main__":
    main()
