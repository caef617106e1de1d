"""The timm backbone: created with its pooling but no classifier, its ImageNet weights, and its blocks."""

from __future__ import annotations

import timm
import torch.nn as nn
from timm.models import group_modules, group_parameters

from finetune.config import ConfigError, FinetuneError


class WeightsUnavailable(FinetuneError):
    """Pretrained weights were asked for and cannot be had."""


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None, pool: str = "avg") -> nn.Module:
    """timm `name` with `num_classes=0` (pooled features out), from ImageNet weights, a local file, or random init."""
    kwargs = {"num_classes": 0, "global_pool": pool}
    if weights is not None:
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ConfigError(f"backbone.weights={weights} does not load into {name}: {first}") from None
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # offline, no cache, hub errors: all end the same way for the user
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise WeightsUnavailable(
            f"ImageNet weights for {name} are not in timm's cache and cannot be downloaded ({cause}). Either "
            f"connect to the internet once (timm caches them), or pass a local file with "
            f"backbone.weights=/path/to/file, "
            f"or train from random init with backbone.pretrained=false."
        ) from None


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """Module names of each block, input side first, in timm's fine-grained grouping (the one layer-wise lr decay uses).

    For MobileNetV2 that is the stem, each of the 17 inverted-residual blocks, and the last block with the
    1x1 head convolution: 18 blocks; `schedule.unfreeze=N` trains the last N of them.
    """
    if hasattr(backbone, "group_matcher"):
        groups = group_modules(backbone, backbone.group_matcher(coarse=False))
        return [names for _, names in sorted(groups.items())]
    return [[name] for name, child in backbone.named_children() if any(True for _ in child.parameters())]


def parameter_blocks(backbone: nn.Module) -> dict[str, int]:
    """The block (index into `backbone_blocks`) of every parameter: timm's own layer map, the one its layer-wise lr
    decay (`param_groups_layer_decay`) uses; parameters no group names go to the last block, as there."""
    if hasattr(backbone, "group_matcher"):
        layers = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    else:
        layers = {}
        for i, names in enumerate(backbone_blocks(backbone)):
            for module in names:
                for name, _ in backbone.get_submodule(module).named_parameters(prefix=module):
                    layers[name] = i
    last = len(backbone_blocks(backbone)) - 1
    return {name: layers.get(name, last) for name, _ in backbone.named_parameters()}
