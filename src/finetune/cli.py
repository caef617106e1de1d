"""What every script does around its work: Hydra's logging only, and user errors as one line with exit status 2."""

from __future__ import annotations

import contextlib
import logging
import sys

from finetune.config import FinetuneError

log = logging.getLogger("finetune")


@contextlib.contextmanager
def script():
    """Run a script's body: a FinetuneError becomes one logged line and exit status 2. In a Hydra multirun it is
    re-raised instead, so the sweep records the job as failed and goes on with the next one."""
    _single_console_logging()
    try:
        yield
    except FinetuneError as e:
        log.error("%s", e)
        if _in_multirun():
            raise
        sys.exit(2)


def _single_console_logging() -> None:
    # The `lightning` package adds its own console handler and also propagates to the root logger, which Hydra
    # has already given a console and a file handler: without this every Lightning message prints twice.
    import lightning  # noqa: F401

    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
    # ...and an advertisement for its cloud logger at the start of every run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
