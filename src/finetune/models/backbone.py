"""The timm backbone: created with its pooling but no classifier, its ImageNet weights, and its blocks."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn
from timm.models import group_modules, group_parameters

from finetune.errors import ConfigError, WeightsUnavailable


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None, pool: str = "avg") -> nn.Module:
    """timm `name` with `num_classes=0` (pooled features out), from ImageNet weights, a local file, or random init.

    Pretrained weights already in the Hugging Face or torch hub cache are loaded from there without any network
    call. Weights not cached need the hub: when it is off (HF_HUB_OFFLINE=1) or unreachable in a few seconds, the
    run stops at once with the ways on, instead of after timm's retries.
    """
    kwargs = {"num_classes": 0, "global_pool": pool}
    if name.startswith(LOCAL):
        import os

        name = LOCAL + os.path.expanduser(name[len(LOCAL):])
    if weights is not None:
        not_weights = _not_a_weights_file(Path(weights).expanduser())
        if not_weights:
            raise ConfigError(f"backbone.weights={weights} is not a weights file ({not_weights}): give a PyTorch "
                              f"state_dict (.pth, .pt, .bin) or a .safetensors file")
        import torch

        rng = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
            torch.manual_seed(0)  # the same random start, without the file: what the file did not replace
            unloaded = _not_loaded(model, timm.create_model(name, pretrained=False, **kwargs))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise ConfigError(f"backbone.weights={weights} does not load into backbone.name={name}: "
                              f"{_why_it_does_not_load(str(e))}") from None
        finally:
            torch.random.set_rng_state(rng)
        if unloaded:
            raise ConfigError(f"backbone.weights={weights} does not load into backbone.name={name}: these are the "
                              f"weights of another architecture ({unloaded}): give the backbone.name they were saved "
                              f"from")
        return model
    if name.startswith(HUB):
        folder = cached_hub_folder(name)  # config and weights in the local Hugging Face cache: no network
        if folder is not None:
            return _create(LOCAL + folder, pretrained, kwargs)
        cause = hub_unavailable(name)
        if cause is not None:
            raise WeightsUnavailable(f"backbone.name={name}: its config and weights are not in the Hugging Face "
                                     f"cache and cannot be downloaded ({cause}). Either connect to the internet once "
                                     "(they are cached), or use timm's name of the architecture with "
                                     "backbone.weights=/path/to/file, or backbone.pretrained=false.")
        return _create(name, pretrained, kwargs)
    if name.startswith(LOCAL) or not pretrained:
        return _create(name, pretrained, kwargs)
    cached = cached_weights(name)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    cause = hub_unavailable(name)
    if cause is None:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # hub errors, a download cut off: all end the same way for the user
            cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise WeightsUnavailable(
        f"ImageNet weights for {name} are not in timm's cache and cannot be downloaded ({cause}). Either "
        f"connect to the internet once (timm caches them), or pass a local file with "
        f"backbone.weights=/path/to/file, "
        f"or train from random init with backbone.pretrained=false."
    )


OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")
HUB, LOCAL = "hf-hub:", "local-dir:"  # timm's prefixes: a model on the Hugging Face Hub, a folder timm saved


def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if not name.startswith((HUB, LOCAL)):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"backbone.name={name} does not load as a timm model: {first}") from None


def architecture(backbone: nn.Module, name: str) -> dict:
    """What rebuilds `backbone` (created from `name`) with no network: timm's architecture name and the arguments
    that a Hub or local-dir config adds. Checkpoints record it; weights come from the checkpoint itself."""
    import os

    from timm.models._hub import load_model_config_from_path

    model_args: dict = {}
    if name.startswith(LOCAL):
        folder = os.path.expanduser(name[len(LOCAL):])
    else:
        folder = cached_hub_folder(name) if name.startswith(HUB) else None
    if folder is not None:
        _, _, model_args = load_model_config_from_path(folder)
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or name
    return {"architecture": arch, "model_args": dict(model_args)}


def rebuild_backbone(backbone_config: dict, pool: str = "avg") -> nn.Module:
    """The backbone of a checkpoint, from its recorded architecture (no download), randomly initialised."""
    arch = backbone_config.get("architecture")
    if arch is None:  # a checkpoint of an earlier release: its name is a timm architecture
        return create_backbone(backbone_config["name"], pretrained=False, pool=pool)
    return timm.create_model(arch, pretrained=False, **{**backbone_config.get("model_args", {}), "num_classes": 0,
                                                        "global_pool": pool})


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub), read now."""
    import os

    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")


def cached_hub_folder(name: str) -> str | None:
    """For `hf-hub:ORG/NAME[@REVISION]`: its snapshot folder in the local Hugging Face cache when that holds its
    config.json and weights (a folder timm loads as `local-dir:`), else None."""
    import os

    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import hf_split

    repo, revision = hf_split(name[len(HUB):])
    config = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    if not isinstance(config, str):
        return None
    folder = os.path.dirname(config)
    weights = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return folder if any(os.path.isfile(os.path.join(folder, w)) for w in weights) else None


def _pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except (RuntimeError, KeyError, ValueError):
        return None


def _not_a_weights_file(path: Path) -> str | None:
    """Why the file at `path` cannot hold weights, judged by its first bytes (a zip: torch.save; a pickle: an older
    torch.save; a length and JSON: safetensors), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return e.strerror or str(e)
    if not head:
        return "it is empty"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON header
        return None
    shown = head.decode("utf-8", "replace").strip().splitlines()[0][:12] if head.strip() else "blank"
    return f"it begins with {shown!r}, like a text file"


def _not_loaded(model: nn.Module, fresh: nn.Module) -> str | None:
    """Which randomly initialised tensors of `model` a weights file left as `fresh` (the same random start) has them,
    as 'N of its M ... (e.g. KEY)'; None when the file gave them all. timm loads a file without its classifier
    non-strictly, so a file of another architecture whose names do not match loaded nothing, silently."""
    import torch

    start, loaded = fresh.state_dict(), model.state_dict()
    random = [k for k, v in start.items()
              if v.is_floating_point() and v.numel() > 1 and bool((v != v.flatten()[0]).any())]
    same = [k for k in random if k in loaded and torch.equal(loaded[k], start[k])]
    if not same:
        return None
    return f"{len(same)} of the backbone's {len(random)} weight tensors are not in the file (e.g. {same[0]})"


def _why_it_does_not_load(message: str) -> str:
    """torch's load_state_dict error as one sentence: how many keys are missing or unexpected, with an example of
    each (its message lists every key, over many lines); other errors as their first line."""
    import re

    if "Error(s) in loading state_dict" not in message:
        return message.strip().splitlines()[0][:300]
    parts = []
    for label, what in (("Missing key(s)", "of the backbone's parameters are not in the file"),
                        ("Unexpected key(s)", "of the file's are not the backbone's")):
        section = re.search(re.escape(label) + r' in state_dict: (.*?)(?:\. *\n|\.$|$)', message, re.S)
        if section:
            keys = re.findall(r'"([^"]+)"', section.group(1))
            parts.append(f"{len(keys)} {what} (e.g. {keys[0]})" if keys else "")
    shapes = re.findall(r"size mismatch for ([\w.]+)", message)
    if shapes:
        parts.append(f"{len(shapes)} have other shapes (e.g. {shapes[0]})")
    found = "; ".join(p for p in parts if p)
    if not found:
        return message.strip().splitlines()[0][:300]
    return f"these are the weights of another architecture ({found}): give the backbone.name they were saved from"


def cached_weights(name: str) -> str | None:
    """The file of `name`'s pretrained weights if a download put it in the Hugging Face hub cache (HF_HOME,
    HF_HUB_CACHE) or torch hub's (TORCH_HOME), else None. timm tries the Hub first, then the release URL."""
    import os

    cfg = _pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from timm.models._hub import hf_split

        repo, revision = hf_split(cfg.hf_hub_id)
        hub = hub_cache_dir()
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, cache_dir=hub, revision=revision)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        from urllib.parse import urlparse

        import torch

        found = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(found):
            return found
    return None


def hub_unavailable(name: str | None = None, seconds: float = 5.0) -> str | None:
    """Why `name`'s weights (without a name: anything on the Hugging Face Hub) cannot be downloaded now (the hub is
    off, or its host does not answer within `seconds`), or None when a download may be tried: one short connection
    attempt, not timm's or datasets' retries."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES:
        return "HF_HUB_OFFLINE is set"
    cfg = _pretrained_cfg(name) if name else None
    from huggingface_hub import constants

    hub = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).hostname or "huggingface.co"  # a mirror too
    host = hub if cfg is None or cfg.hf_hub_id else urlparse(cfg.url or "").hostname
    if not host:
        return None
    port = 443
    import urllib.request

    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):  # behind a proxy, the proxy is what must answer
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 8080
    answer: list[str | None] = []

    def connect():  # in a thread: a name lookup that hangs is not bounded by the socket's timeout
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"{host} is unreachable: {e.strerror or e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else f"{host} did not answer within {seconds:.0f} s"


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


def pretrained_backbones(pattern: str = "*", limit: int = 100) -> tuple[list[dict], int]:
    """timm's names with pretrained weights matching `pattern` (fnmatch; a bare word matches anywhere in the name),
    with input size, crop and parameter count (without the classifier, counted on the meta device: nothing is
    allocated or downloaded); at most `limit` of them, and how many matched."""
    import torch

    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = timm.list_pretrained(pattern)
    rows = []
    for name in names[:limit]:
        cfg = _pretrained_cfg(name)
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in timm.create_model(name, num_classes=0).parameters())
        except Exception:  # a model that cannot be built on the meta device: its count is unknown, not an error
            params = None
        rows.append({"name": name, "input": "x".join(str(v) for v in cfg.input_size[1:]) if cfg else "?",
                     "crop": cfg.crop_pct if cfg else None, "params": params})
    return rows, len(names)


def backbones_table(pattern: str = "*") -> str:
    """`uv run scripts/train.py --backbones [PATTERN]`: the table it prints."""
    rows, total = pretrained_backbones(pattern)
    if not rows:
        return f"No timm backbone with pretrained weights matches {pattern!r} (try a shorter pattern: convnext, vit)"
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'backbone.name':<{width}}  {'input':>9}  {'crop':>5}  {'params':>8}"]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] is not None else "?"
        crop = f"{r['crop']:.3f}" if r["crop"] else "-"
        lines.append(f"{r['name']:<{width}}  {r['input']:>9}  {crop:>5}  {params:>8}")
    if total > len(rows):
        lines.append(f"... and {total - len(rows)} more: narrow the pattern")
    return "\n".join(lines)


def check(backbone) -> None:
    """Any name timm.create_model takes: an architecture, ARCH.TAG (one of its pretrained tags), hf-hub:ORG/NAME or
    local-dir:PATH (a folder holding config.json and weights, as timm saves it)."""
    import difflib
    import re
    from pathlib import Path

    def _check(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    name = backbone.name
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        _check((folder / "config.json").is_file(), f"backbone.name={name}: expected a folder holding config.json and "
                                                   "its weights (model.safetensors or pytorch_model.bin), as timm's "
                                                   "save_for_hf writes it")
    elif name.startswith("hf-hub:"):
        _check(re.fullmatch(r"hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?", name) is not None,
               f"backbone.name={name}: a Hub model is named hf-hub:ORG/NAME (hf-hub:timm/convnext_tiny.fb_in22k)")
    else:
        arch, _, tag = name.partition(".")
        names = timm.list_models()
        if arch not in names:
            alternatives = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
            hint = f" Closest timm names: {', '.join(alternatives)}." if alternatives else ""
            what = f"backbone.name={name}: {arch}" if tag else f"backbone.name={name}"
            raise ConfigError(f"{what} is not a timm model.{hint}")
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if n.split(".", 1)[0] == arch]
        if tag and tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.3)
            known = ", ".join(close + [t for t in tags if t not in close]) if tags else "none"
            raise ConfigError(f"backbone.name={name}: {arch} has no pretrained tag {tag!r}; its tags: {known}")
        if backbone.weights is None and backbone.pretrained:
            _check(bool(tags), f"timm has no pretrained weights for {name}: set backbone.pretrained=false "
                               "or backbone.weights=/path/to/file")
    if backbone.weights is not None:
        _check(Path(backbone.weights).is_file(), f"backbone.weights={backbone.weights}: no such file")
