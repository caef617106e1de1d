"""Which run this is, decided before any heavy import: a fresh run, resume= of a run, resume=auto, a run that has
finished, and the schedule a random backbone gets. The scripts decide with it, and with finetune.checks, before they
load the back half (torch, Lightning, timm): a command that cannot run ends here, in seconds, as one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune import checks, presets, rundir
from finetune.config import TrainConfig
from finetune.errors import ConfigError

log = logging.getLogger(__name__)

# The config groups of conf/train.yaml: GROUP=OPTION on a resume's command line names a preset, not a value.
GROUPS = presets.groups()  # the config groups of conf/train.yaml's defaults list: dataset, backbone, head, ...


@dataclass
class Plan:
    """What a training command is: its validated config, whether it continues a run, and for resume=auto of a run
    that has finished, that run's metrics (nothing is left to do). `changes`: values a resume changes, written into
    the run's config.yaml (the old one kept beside it) once the run starts."""

    cfg: DictConfig
    resuming: bool = False
    finished: dict | None = None
    changes: list[str] = field(default_factory=list)


def plan(cfg: DictConfig, overrides: list[str] | None = None) -> Plan:
    """Decide what `cfg` (composed from the command line `overrides`; default: this Hydra command line's) asks for,
    and check it: ConfigError for a command that cannot run, before any work. Writes nothing."""
    overrides = command_line_overrides() if overrides is None else overrides
    if cfg.get("resume") == "auto":
        finished = continue_or_start(cfg)
        if finished is not None:
            return Plan(cfg, finished=finished)
    if cfg.get("resume") is not None:
        merged, changes = resume_config(cfg, overrides)
        return Plan(checks.validate(merged), resuming=True, changes=changes)
    chosen: list[str] = []
    use_scratch_when_nothing_to_protect(cfg, overrides, say=chosen.append)
    cfg = checks.validate(cfg)
    refuse_a_finished_run(Path(cfg.run_dir))
    for message in chosen:  # once the command is known to run: a refused one is its one line alone
        log.info("%s", message)
    return Plan(cfg)


def command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def gives(overrides: list[str], key: str) -> bool:
    """Whether the command line `overrides` set `key` itself."""
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def continue_or_start(cfg: DictConfig) -> dict | None:
    """resume=auto: continue the run that cfg.run_dir holds (a requeued SLURM job runs again in its own directory; so
    does the same command with hydra.run.dir=DIR), start a fresh one where it holds none; cfg.resume says which.
    A finished run (metrics.json) is not trained again: its metrics are returned, and the command ends well (a requeue
    that comes after the run finished has nothing left to do)."""
    run_dir = Path(cfg.run_dir)
    metrics, last = run_dir / rundir.METRICS, rundir.last(run_dir)
    if metrics.is_file():
        log.info("resume=auto: %s holds a finished run (metrics.json), so there is nothing to do: it is not trained "
                 "again. To train it longer: resume=%s schedule.epochs=N", run_dir, run_dir)
        return json.loads(metrics.read_text())
    if last.is_file():
        log.info("resume=auto: %s holds a run; continuing it from %s", run_dir, last)
        cfg.resume = str(run_dir)
        return None
    others = sorted(run_dir.glob(f"{rundir.CHECKPOINTS}/*.ckpt"))
    if others:
        raise ConfigError(f"resume=auto: {run_dir} holds {', '.join(p.name for p in others)} but no {last.name} to "
                          f"continue from, and a fresh run would overwrite it: `cp {others[0]} {last}` continues "
                          f"from that checkpoint's epoch; or give the new run another hydra.run.dir")
    log.info("resume=auto: %s holds no run yet; starting a fresh one", run_dir)
    cfg.resume = None
    return None


def refuse_a_finished_run(run_dir: Path) -> None:
    """A fresh run never writes over a run directory that already holds one (hydra.run.dir=an earlier run)."""
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:  # a DDP worker started by rank 0, in rank 0's own directory
        return
    held = [p.name for p in (run_dir / rundir.METRICS, *sorted(run_dir.glob(f"{rundir.CHECKPOINTS}/*.ckpt")))
            if p.is_file()]
    if held:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}), which a new run would overwrite: "
                          f"continue it with resume={run_dir}, or give the new run another hydra.run.dir")


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The config of run `cfg.resume`, with the single values given on this command line (schedule.epochs=20), and
    those values. Refuses a run that has finished its epochs, unless schedule.epochs asks for more."""
    run_dir = Path(cfg.resume).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={cfg.resume}: no such run directory")
    last = rundir.last(run_dir)
    if not last.is_file():
        raise ConfigError(f"resume={cfg.resume}: there is no {last} to resume from (no fresh run was started)")
    saved_path = run_dir / rundir.CONFIG
    if not saved_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: {saved_path} is missing, so this is not a finetune run directory")
    saved = OmegaConf.load(saved_path)
    if "schedule" in saved and "norm_bias_decay" not in saved.schedule:
        saved.schedule.norm_bias_decay = True  # a run of a release that decayed every parameter: same groups again
    if "schedule" in saved and "bn" not in saved.schedule:
        saved.schedule.bn = "train"  # a run of a release that always trained BatchNorm: it goes on doing so
    as_a_fresh_run = cfg.copy()  # what this command line would run without resume=: compared with the run's own
    use_scratch_when_nothing_to_protect(as_a_fresh_run, overrides, say=None)
    changes = []
    last_of_each = {override.lstrip("+~").partition("=")[0]: override for override in overrides}  # as Hydra: last wins
    for override in last_of_each.values():
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        if key in GROUPS:
            singles = {k for k in last_of_each if k not in GROUPS}
            differing = presets.differences(key, value, saved, composed=as_a_fresh_run, skip=singles)
            if differing:
                raise ConfigError(f"resume={cfg.resume} continues that run with its own config, and {override} is not "
                                  f"it ({', '.join(differing[:3])}): change single values (schedule.epochs=20), or "
                                  f"start a new run")
            continue  # the same group as the run's own: the same command line again
        unset = object()
        if OmegaConf.select(saved, key, default=unset) == OmegaConf.select(
                OmegaConf.from_dotlist([override.lstrip("+")]), key):
            continue  # the value the run already has
        if key == "schedule.ema":
            raise ConfigError(f"resume={cfg.resume}: schedule.ema cannot change when a run resumes (its checkpoints "
                              f"hold the averaged weights, or not): start a new run")
        changes.append(override.lstrip("+"))
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved, OmegaConf.from_dotlist(changes))
    merged.resume = str(run_dir)
    merged.run_dir = str(run_dir)
    metrics = run_dir / rundir.METRICS
    if metrics.is_file():
        done = json.loads(metrics.read_text()).get("epochs")
        longer = any(c.startswith("schedule.epochs=") for c in changes) and merged.schedule.epochs > (done or 0)
        if not longer:
            raise ConfigError(f"resume={cfg.resume}: that run has finished its {done} epochs (metrics.json), so there "
                              f"is nothing to continue: to train it longer, resume={cfg.resume} schedule.epochs=N "
                              f"with N > {done}; or start a new run")
    return merged, changes


def record_resume(cfg: DictConfig, changes: list[str]) -> None:
    """Write a resumed run's changed config into its config.yaml, the previous one kept as
    config.before-resume-N.yaml (rank 0 only: the other processes of a torchrun run read it)."""
    if not changes or not is_rank_zero():
        return
    run_dir = Path(cfg.run_dir)
    saved_path = run_dir / rundir.CONFIG
    backup = run_dir / f"config.before-resume-{len(list(run_dir.glob('config.before-resume-*.yaml'))) + 1}.yaml"
    shutil.copy2(saved_path, backup)
    save_config(cfg, saved_path)
    log.info("Resuming with %s; the previous config is kept as %s", ", ".join(changes), backup.name)


def save_config(cfg: DictConfig, path: Path) -> None:
    """Written whole or not at all, by rank 0 alone: the other processes of a torchrun run may be reading it."""
    if is_rank_zero():
        rundir.write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def is_rank_zero() -> bool:
    """Whether this is the first process of its run (or the only one), from the variables its launcher set, as
    Lightning's rank_zero_only reads them."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return True


# Keys that say how the backbone is fine-tuned: when none of them is set (on the command line, or by a dataset or
# experiment preset) and the backbone starts from random weights, the run uses schedule=scratch.
PHASE_KEYS = ("phases", "freeze_epochs", "unfreeze", "backbone_lr_ratio", "layer_decay")


def use_scratch_when_nothing_to_protect(cfg, overrides: list[str], say=log.info) -> bool:
    """A backbone that starts from random weights has nothing to protect: with the default schedule and none of its
    phase keys given, switch to conf/schedule/scratch.yaml (one phase, everything at the full rate) and say so; with
    phases of the user's, BatchNorm still trains (schedule.bn=train: random running statistics are no statistics),
    unless schedule.bn is given. Returns whether it switched to scratch. `say(message)` tells what it chose
    (None: nothing)."""
    if cfg.backbone.pretrained or cfg.backbone.get("weights"):
        return False
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if cfg.schedule.get("name") != "default" or "schedule" in given or any(
            g == f"schedule.{k}" or g.startswith(f"schedule.{k}.") for g in given for k in PHASE_KEYS):
        return _train_batchnorm_of_a_random_backbone(cfg, given, say)
    preset = presets.resolved("schedule", "default")
    if any(cfg.schedule.get(k) != preset.get(k) for k in PHASE_KEYS):  # a dataset or experiment preset chose
        return _train_batchnorm_of_a_random_backbone(cfg, given, say)
    scratch = presets.load("schedule", "scratch")
    if "schedule.bn" in given:
        scratch.pop("bn", None)
    cfg.schedule = OmegaConf.merge(cfg.schedule, scratch)
    if say:
        say("backbone.pretrained=false: a randomly initialised backbone has nothing to protect, so this run uses "
            "schedule=scratch (everything trains at the full rate from the first epoch). Name a schedule "
            "(schedule=default) or its keys (schedule.freeze_epochs=...) to choose otherwise.")
    return True


def _train_batchnorm_of_a_random_backbone(cfg, given: set[str], say=log.info) -> bool:
    if "schedule.bn" not in given and cfg.schedule.get("bn") != "train":
        cfg.schedule.bn = "train"
        if say:
            say("backbone.pretrained=false: BatchNorm trains (schedule.bn=train), as a randomly initialised backbone "
                "has no statistics to keep")
    return False


