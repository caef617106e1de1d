"""A checkpoint as ONNX or TorchScript, checked for parity: uv run scripts/export.py ckpt=... format=onnx
The same entry point as `finetune export` (finetune.commands.export)."""

from finetune.commands.export import cli

if __name__ == "__main__":
    cli()
