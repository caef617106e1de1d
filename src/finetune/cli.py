"""What every script does around its work: Hydra's logging only, and user errors as one line with exit status 2.
Front half: no torch, Lightning or timm here, so that a command that cannot run says so in seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from finetune.errors import INTERRUPTED, PREEMPTED, REFUSED, FinetuneError

log = logging.getLogger("finetune")


def expand_home_in_arguments() -> None:
    """`KEY=~/path` on the command line means the home folder, as `~/path` alone would: bash does not expand `~`
    after `KEY=`, and Hydra's override grammar cannot parse it. Expanded in sys.argv before Hydra reads it."""
    for i, arg in enumerate(sys.argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if sep and not key.startswith("-") and value.startswith("~"):
            sys.argv[i] = f"{key}={os.path.expanduser(value)}"


def one_run_directory_under_torchrun() -> None:
    """torchrun starts every process of a run itself, and each would name its run directory after its own clock:
    add the overrides that give them one (finetune.cluster.torchrun_arguments), in sys.argv before Hydra reads it.
    Where they cannot agree, one line and exit status 2, before any process writes anything."""
    from finetune.cluster import torchrun_arguments

    try:
        sys.argv += torchrun_arguments(sys.argv[1:])
    except FinetuneError as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)


# Hydra plugins a command line may ask for, and the optional extra that installs each: (override, its value or None for
# any) -> (extra, plugin module). Hydra itself would fail to compose without them, with a message about its search path.
PLUGINS = {
    ("hydra/launcher", "slurm"): ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/launcher", "submitit_slurm"): ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/launcher", "submitit_local"): ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/sweeper", "optuna"): ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
    ("hparams_search", None): ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
}


def require_plugins_of_the_command_line() -> None:
    """The Hydra plugins the command line asks for (hydra/launcher=slurm, hparams_search=...) installed, or one line
    naming the extra that installs them and exit status 2, before Hydra composes anything."""
    from finetune.errors import MissingExtra, require_extra

    for arg in sys.argv[1:]:
        key, _, value = arg.lstrip("+~").partition("=")
        for (group, option), (extra, module) in PLUGINS.items():
            if key == group and (option is None or value == option) and value not in ("null", ""):
                try:
                    require_extra(extra, arg, (module,))
                except MissingExtra as e:
                    print(e, file=sys.stderr)
                    sys.exit(e.exit_code)


def check_the_command_line(args: list[str] | None = None) -> None:
    """GROUP=OPTION naming no preset, or KEY=VALUE naming no key of the training schema: one line and exit status 2,
    before Hydra composes anything (Hydra's own messages for these are ten lines, the search path included)."""
    problem = command_line_problem(sys.argv[1:] if args is None else args)
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(REFUSED)


def command_line_problem(args: list[str]) -> str | None:
    """What is wrong with the first GROUP=OPTION or KEY=VALUE of `args` that names nothing, as one line; None."""
    from finetune.errors import ConfigError, suggest
    from finetune.presets import CONF

    given = dict(arg.partition("=")[::2] for arg in args if "=" in arg and not arg.startswith("-"))
    one_run = "-m" not in args and "--multirun" not in args
    from finetune.runconfig import is_rank_zero

    if "hydra.run.dir" in given and one_run and is_rank_zero():  # before Hydra writes .hydra/ and train.log there
        from finetune import rundir

        run_dir = Path(given["hydra.run.dir"]).expanduser()
        holder = rundir.holder(run_dir)
        if holder is not None:
            return rundir.held_message(run_dir, holder)
    if "hydra.run.dir" in given and given.get("resume", "null") in ("null", "None", "") and one_run:
        from finetune.runconfig import refuse_a_finished_run

        try:
            refuse_a_finished_run(Path(given["hydra.run.dir"]).expanduser())
        except ConfigError as e:
            return str(e)
    searched = "hydra.searchpath" in given  # presets of the user's own: Hydra finds them, and says if it does not
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or key.startswith(("+", "~", "hydra")) or "/" in key:
            continue  # flags, appended or deleted keys, Hydra's own settings and plugin groups are Hydra's to check
        if (CONF / key).is_dir() and not searched:  # a config group: its options are the files in conf/GROUP/
            options = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
            if "(" in value:  # a sweep function: choice(...), range(...)
                continue
            for option in value.strip("[]").split(","):
                option = option.strip()
                if option and option not in options and option not in ("null", "None", "none"):
                    return (f"{key}={option}: there is no such {key} preset; one of {', '.join(options)}."
                            f"{suggest(option, options)}")
            continue
        unknown = _unknown_key(key)
        if unknown:
            return unknown
    return None


def _unknown_key(key: str) -> str | None:
    """Where a dotted `key` leaves the training schema (finetune.config.TrainConfig), as a sentence; None when it
    names a key, or a part of the config that takes any key (trainer.*)."""
    import dataclasses
    import typing

    from finetune.config import TrainConfig
    from finetune.errors import suggest

    node, path = TrainConfig, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            names, prefix = sorted(hints), "".join(f"{p}." for p in path)
            where = f"in {'.'.join(path)}" if path else "at the top of the config"
            return (f"{key}: there is no such key {where} (its keys: {', '.join(names)})."
                    f"{suggest(key, [prefix + n for n in names])}")
        path.append(part)
        node = hints[part]
        inner = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) is typing.Union and len(inner) == 1:  # Optional[X]
            node = inner[0]
    return None


# Set by script() when a job of a multirun fails; finetune.sweep.SweepReport records it for the sweep's report.
job_error: str | None = None


@contextlib.contextmanager
def script():
    """Run a script's body. A FinetuneError becomes one logged line and its exit status (2; 130 when interrupted,
    143 when pre-empted); Ctrl-C elsewhere too (130). Any other exception is one line naming it and the file that
    holds its traceback (the run's train.log), exit status 1: no traceback reaches the console.

    In a multirun, a failed job (any error) is logged and recorded for the sweep's report, and the sweep goes on
    with the next job; it exits non-zero at the end. Sweepers that count failures themselves (Optuna) get the
    error raised. A pre-empted or interrupted job stops the whole sweep.
    """
    global job_error
    _single_console_logging()
    try:
        yield
    except KeyboardInterrupt:
        log.error("Interrupted (Ctrl-C). Nothing was lost: files already written (checkpoints, caches) are whole; "
                  "a training run continues with resume=RUN_DIR")
        sys.exit(INTERRUPTED)
    except FinetuneError as e:
        log.error("%s", e)
        if not _in_multirun() or e.exit_code in (INTERRUPTED, PREEMPTED):  # stopped: the sweep stops too
            sys.exit(e.exit_code)
        job_error = str(e)
        if not _basic_sweeper():
            raise
    except Exception as e:
        if not _in_multirun():
            where = _keep_traceback()
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            log.error("Unexpected error: %s%s (a case finetune does not handle yet: please report it with the "
                      "traceback). The full traceback is in %s", type(e).__name__, f": {text}" if text else "", where)
            sys.exit(1)
        log.exception("The job failed")
        job_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not _basic_sweeper():
            raise


def _keep_traceback() -> str:
    """Write the current exception's traceback where it does not reach the console: the run's log file (train.log)
    when Hydra gave it one, else a file in the temporary folder. Returns where."""
    import tempfile
    import traceback

    record = logging.LogRecord("finetune", logging.ERROR, __file__, 0, "Traceback of the unexpected error:\n%s",
                               (traceback.format_exc(),), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()
            return handler.baseFilename
    path = Path(tempfile.gettempdir()) / f"finetune-error-{os.getpid()}.log"
    path.write_text(traceback.format_exc())
    return str(path)


def _single_console_logging() -> None:
    """Lightning's messages once, in Hydra's format and log file, without its advertisements. Needs no Lightning
    import: the front half runs before it loads (quiet_lightning removes the console handler its import adds)."""
    quiet_lightning()
    # ...and an advertisement for its cloud logger at the start of every run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))
    # Lightning 2.6's own pytree helper still uses an API that torch 2.10+ deprecates, and says so on every batch
    # transfer: a message for Lightning's developers, not for ours.
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def quiet_lightning() -> None:
    """The `lightning` package adds its own console handler when it is imported, and also propagates to the root
    logger, which Hydra has already given a console and a file handler: without this every Lightning message prints
    twice. Called when the script starts and again once the back half (which imports Lightning) is loaded."""
    if "lightning" in sys.modules and logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _basic_sweeper() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return "BasicSweeper" in str(HydraConfig.get().sweeper.get("_target_", ""))
