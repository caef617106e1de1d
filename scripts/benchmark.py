"""finetune against plain PyTorch, side by side: uv run scripts/benchmark.py [device=cpu|cuda] [out=benchmark.json]
The same entry point as `finetune benchmark` (finetune.commands.benchmark)."""

from finetune.commands.benchmark import cli

if __name__ == "__main__":
    cli()
