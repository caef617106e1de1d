"""Worker processes and Ctrl-C: a terminal sends SIGINT to every process of a command, and the parent alone should
answer it (one line, exit status 130). Imports nothing of the package: the data code's pools and loaders use it."""

from __future__ import annotations

import contextlib


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
