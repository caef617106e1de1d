"""What every script does around its work: Hydra's logging only, and user errors as one line with exit status 2.
Front half: no torch, Lightning or timm here, so that a command that cannot run says so in seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


def ignore_interrupts() -> None:
    """For worker processes: Ctrl-C reaches the whole process group; the parent says what happened, once, and its
    workers stop with it quietly instead of each printing a traceback. Started inside interrupts_held(), a worker
    drops a Ctrl-C that came while it started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C held back while worker processes are forked, then delivered: one arriving during a fork reached
    Python's at-fork handlers, which print it as an ignored exception and drop it, so the parent went on as if
    nothing had happened (seen: an integrity scan that went on after Ctrl-C). Workers inherit the held signal and
    drop it (ignore_interrupts); the parent gets it as KeyboardInterrupt once this block ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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
        sys.exit(130)
    except FinetuneError as e:
        log.error("%s", e)
        if not _in_multirun() or e.exit_code in (130, 143):  # interrupted or pre-empted: the sweep stops too
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


def free_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free of path-2, path-3, ... (before any suffix)."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _basic_sweeper() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return "BasicSweeper" in str(HydraConfig.get().sweeper.get("_target_", ""))
