"""conf/: where the Hydra presets are, one preset read as plain config, and what differs between one and a run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# finetune/conf/: the Hydra configs the commands compose, inside the package (an installed wheel has them), read also
# for presets (schedule=scratch, a resumed run's groups)
CONF = Path(__file__).resolve().parent / "conf"


def load(group: str, option: str) -> DictConfig:
    """conf/GROUP/OPTION.yaml without its defaults list: the values the preset itself sets."""
    preset = OmegaConf.load(CONF / group / f"{option}.yaml")
    preset.pop("defaults", None)
    return preset


def resolved(group: str, option: str) -> DictConfig:
    """conf/GROUP/OPTION.yaml over the schema's defaults of its group: every value a run of that preset starts with
    (a default preset states only what differs from the schema)."""
    from finetune.config import TrainConfig

    if group not in TrainConfig.__dataclass_fields__:
        return load(group, option)
    return OmegaConf.merge(OmegaConf.structured(TrainConfig)[group], load(group, option))


def groups() -> tuple[str, ...]:
    """The config groups of conf/train.yaml's defaults list (dataset, backbone, ...; not Hydra's own)."""
    listed = OmegaConf.load(CONF / "train.yaml").get("defaults", [])
    return tuple(name for entry in listed if isinstance(entry, (dict, DictConfig)) for name in entry if name != "hydra")


def differences(group: str, option: str, saved: DictConfig, composed: DictConfig | None = None,
                skip: set[str] = frozenset()) -> list[str]:
    """Where conf/GROUP/OPTION.yaml differs from the saved run's config, as `key: saved -> preset`; [] when the
    preset is what the run already has. With `composed` (the command line's whole config), each key the preset sets
    is compared as that config has it (a later KEY=VALUE of the command line wins over the preset, as in Hydra);
    keys in `skip` are not compared (the single values a resume checks on its own)."""
    if option.startswith("[") and option.endswith("]"):  # logger=[tensorboard,mlflow]: each of the presets
        return [d for one in option[1:-1].split(",") if one.strip()
                for d in differences(group, one.strip(), saved, composed, skip)]
    path = CONF / group / f"{option}.yaml"
    if option in ("null", "None", ""):
        return []
    if not path.is_file():
        return [f"there is no {group} preset {option}"]
    in_its_group = "@package _global_" not in path.read_text()
    preset = load(group, option)
    if in_its_group and "name" not in preset:  # a default preset states only what differs from the schema: its name
        named = OmegaConf.select(resolved(group, option), "name", default=None, throw_on_missing=False)
        if named is not None:
            preset["name"] = named
    base = f"{group}." if in_its_group else ""
    differing = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            if OmegaConf.is_missing(node, key):  # ??? (dataset.root): the preset leaves it to the command line
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
                continue
            if f"{prefix}{key}" in skip:
                continue
            if composed is not None:
                value = OmegaConf.select(composed, f"{prefix}{key}", default=value)
            have = OmegaConf.select(saved, f"{prefix}{key}", default=None)
            if OmegaConf.is_list(value):
                value = as_the_schema_types_it(f"{prefix}{key}", value)
                have = as_the_schema_types_it(f"{prefix}{key}", have) if OmegaConf.is_list(have) else have
            if have != value:
                differing.append(f"{prefix}{key}: {have} -> {value}")

    walk(preset, base)
    return differing


def as_the_schema_types_it(key: str, value) -> list:
    """A list at `key` as a run's config.yaml holds it: each element filled with its schema's defaults (a preset's
    `{train: head, epochs: 2}` is saved as `{train: head, epochs: 2, lr: null, ...}`, and is the same phase)."""
    from finetune.config import TrainConfig

    container = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    try:
        nested = container
        for part in reversed(key.split(".")):
            nested = {part: nested}
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), nested)
        return OmegaConf.to_container(OmegaConf.select(typed, key))
    except Exception:  # a key outside the schema (a callback's own list): compared as it is written
        return container
