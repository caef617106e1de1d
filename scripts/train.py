"""Train, test and record one run (or one per value with -m): uv run scripts/train.py [GROUP=OPTION] [KEY=VALUE]
`uv run scripts/train.py --backbones [PATTERN]` lists the timm backbones with pretrained weights that match.
The same entry point as `finetune train` (finetune.commands.train)."""

from finetune.commands.train import cli

if __name__ == "__main__":
    cli()
