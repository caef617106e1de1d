"""conf/: where the Hydra presets are, one preset read as plain config, and what differs between one and a run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# conf/: the Hydra configs the scripts compose, read also for presets (schedule=scratch, a resumed run's groups)
CONF = Path(__file__).resolve().parents[2] / "conf"


def load(group: str, option: str) -> DictConfig:
    """conf/GROUP/OPTION.yaml without its defaults list: the values the preset itself sets."""
    preset = OmegaConf.load(CONF / group / f"{option}.yaml")
    preset.pop("defaults", None)
    return preset


def differences(group: str, option: str, saved: DictConfig) -> list[str]:
    """Where conf/GROUP/OPTION.yaml differs from the saved run's config, as `key: saved -> preset`; [] when the
    preset is what the run already has."""
    if option.startswith("[") and option.endswith("]"):  # logger=[tensorboard,mlflow]: each of the presets
        return [d for one in option[1:-1].split(",") if one.strip()
                for d in differences(group, one.strip(), saved)]
    path = CONF / group / f"{option}.yaml"
    if option in ("null", "None", ""):
        return []
    if not path.is_file():
        return [f"there is no {group} preset {option}"]
    preset = load(group, option)
    base = "" if "@package _global_" in path.read_text() else f"{group}."
    differing = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            if OmegaConf.is_missing(node, key):  # ??? (dataset.root): the preset leaves it to the command line
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
                continue
            have = OmegaConf.select(saved, f"{prefix}{key}", default=None)
            if OmegaConf.is_list(value):
                value = OmegaConf.to_container(value)
                have = OmegaConf.to_container(have) if OmegaConf.is_list(have) else have
            if have != value:
                differing.append(f"{prefix}{key}: {have} -> {value}")

    walk(preset, base)
    return differing
