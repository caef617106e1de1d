"""Metrics, a classification report and figures for a checkpoint: uv run scripts/evaluate.py ckpt=...
The same entry point as `finetune evaluate` (finetune.commands.evaluate)."""

from finetune.commands.evaluate import cli

if __name__ == "__main__":
    cli()
