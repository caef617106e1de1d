"""What the tests share (on pytest's pythonpath: `from support import ...`): the config they compose, scripts run as
a user runs them (in this process through their entry point, or as a real process where the test is about one),
and waiting on a process. Fabricated datasets are in support.fabricate, callbacks that watch a run in
support.recorders."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# Small, fast and quiet: every training test runs at 32 px on the CPU without a progress bar.
FAST = [
    "dataset.image_size=32", "dataset.num_workers=0", "dataset.batch_size=16", "trainer.accelerator=cpu",
    "trainer.devices=1", "callbacks.progress_bar=false", "+trainer.enable_model_summary=false",
    "backbone.pretrained=false", "trainer.log_every_n_steps=2", "callbacks.dashboards.enabled=false",
]

_COMPOSED: list = []


def compose(run_dir: Path, *overrides: str):
    """conf/train.yaml composed with `overrides`, writing into `run_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.config  # noqa: F401  (the schema conf/train.yaml builds on)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"run_dir={run_dir}", *overrides])
    _COMPOSED.append((cfg, list(overrides)))
    return cfg


def given(cfg) -> list[str]:
    """The overrides `cfg` was composed with: what finetune.train.run gets as the command line, as the script does."""
    return next(overrides for composed, overrides in reversed(_COMPOSED) if composed is cfg)


@dataclass
class Finished:
    """What a script left: its exit status and what it printed (stdout and stderr together, in order)."""

    returncode: int
    output: str

    @property
    def stdout(self) -> str:
        return self.output

    stderr = ""


def run_script(name: str, *args: str, cwd: Path, env: dict | None = None) -> Finished:
    """scripts/NAME.py with `args` as its command line, in this process, through its own entry point and argument
    parsing (Hydra's); its exit status and its console output. The logging Hydra set up for it is taken down after,
    so that its log file and console stream do not catch the next test's records."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    argv, here, out, err = sys.argv, os.getcwd(), sys.stdout, sys.stderr
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    captured = io.StringIO()
    sys.argv = [str(ROOT / "scripts" / f"{name}.py"), *args]
    GlobalHydra.instance().clear()
    code = 0
    try:
        os.chdir(cwd)
        sys.stdout = sys.stderr = captured
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv, sys.stdout, sys.stderr = argv, out, err
        os.chdir(here)
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Finished(code, captured.getvalue())


def start_process(name: str, *args: str, cwd: Path, env: dict | None = None,
                  python: tuple[str, ...] = (), group: bool = False) -> subprocess.Popen:
    """scripts/NAME.py as a real process (for signals, kill -9, torchrun, DDP, a README command), its stdout and
    stderr together in `.stdout`; `python`: arguments for the interpreter (-m torch.distributed.run ...); `group`:
    in a process group of its own, as a terminal starts a command (then ctrl_c() reaches it and its workers)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "benchmarks")]), **(env or {})}
    return subprocess.Popen([sys.executable, *python, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=cwd,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)


def ctrl_c(process: subprocess.Popen) -> None:
    """What Ctrl-C in a terminal does: SIGINT to every process of the command's group (its workers too)."""
    import signal

    os.killpg(process.pid, signal.SIGINT)


class Output:
    """The lines a started process prints, read as they come (a thread), so a test can wait for one of them."""

    def __init__(self, process: subprocess.Popen):
        import threading

        self.process, self.lines = process, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        started = time.time()
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() - started < timeout, f"{text!r} was not printed: {''.join(self.lines)[-3000:]}"
            time.sleep(0.02)

    def end(self, timeout: float = 120) -> str:
        """Wait for the process to end; all it printed."""
        self.process.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return "".join(self.lines)


def run_process(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> Finished:
    """start_process, waited for: its exit status and output."""
    process = start_process(name, *args, cwd=cwd, env=env)
    output = process.communicate(timeout=timeout)[0]
    return Finished(process.returncode, output)


def wait_for(path, process, timeout=300):
    """Wait until `path` exists while `process` (a Popen with stdout piped) still runs; fail with its output if not."""
    started = time.time()
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() - started < timeout, f"{path} did not appear"
        time.sleep(0.05)


def second_checkpoint(last: Path, process) -> int:
    """Wait for the training `process` to write `last` (last.ckpt) twice: after its first epoch, and after the next
    (in the next phase: training is under way whatever the machine's speed), then a moment more, so a signal sent
    now lands in the middle of an epoch. The first checkpoint's global step: the steps of an epoch."""
    import torch

    wait_for(last, process)
    step = torch.load(last, weights_only=True)["global_step"]
    started = time.time()
    while torch.load(last, weights_only=True)["global_step"] == step:
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() - started < 300, "no second checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    return step


def sigterm_after_first_checkpoint(process, run_dir):
    """Wait for the training `process` to write RUN_DIR's first last.ckpt (its first epoch) and then its second (the
    next epoch, in the next phase, is done: training is under way whatever the machine's speed), send it SIGTERM a
    moment later, in the epoch after, and check it exits with 143; the global step of that first checkpoint (the
    steps of an epoch), and the output."""
    import signal

    step = second_checkpoint(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    return step, output
