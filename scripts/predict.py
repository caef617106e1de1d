"""What a checkpoint or an ONNX export says of images: uv run scripts/predict.py ckpt=...|model=... inputs=PATH
The same entry point as `finetune predict` (finetune.commands.predict)."""

from finetune.commands.predict import cli

if __name__ == "__main__":
    cli()
