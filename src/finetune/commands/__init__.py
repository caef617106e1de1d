"""The `finetune` command: `finetune train|evaluate|predict|export|benchmark KEY=VALUE ...`, each the same entry
point as its script (scripts/train.py, ...), with the same overrides, messages and exit statuses. One module per
command, each named for it (Hydra names the job, and so the log file, after the module: train.log)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train, test and record a run (or a sweep with -m)",
    "evaluate": "metrics, a report and figures for a checkpoint, on its test split or any labelled set",
    "predict": "what a checkpoint or an export says of images, files or folders",
    "export": "a checkpoint as ONNX (float32, fp16, int8) or TorchScript, checked for parity and measured",
    "benchmark": "finetune's training and inference speed against plain PyTorch, side by side",
}

USAGE = "usage: finetune {" + ",".join(COMMANDS) + "} [KEY=VALUE ...]   (finetune COMMAND --help: its config)"


def main(argv: list[str] | None = None) -> None:
    """The console script: the command's name first, then what its script takes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        for name, what in COMMANDS.items():
            print(f"  {name:<10} {what}")
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from finetune.errors import REFUSED, suggest

        print(f"finetune {name}: there is no such command; one of {', '.join(COMMANDS)}."
              f"{suggest(name, list(COMMANDS))}", file=sys.stderr)
        sys.exit(REFUSED)
    sys.argv = [f"finetune {name}", *rest]
    importlib.import_module(f"finetune.commands.{name}").cli()
