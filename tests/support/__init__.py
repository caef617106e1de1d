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
from types import SimpleNamespace

from support.recipes import FAST  # noqa: F401  (the tests' `from support import FAST`)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "src" / "finetune" / "conf"

_COMPOSED: list = []


def compose(run_dir: Path, *overrides: str):
    """The training config of `overrides`, writing into `run_dir`, through the front door (finetune.compose: what
    finetune.train and the command line compose)."""
    import finetune

    cfg = finetune.compose(f"run_dir={run_dir}", *overrides)
    _COMPOSED.append((cfg, list(overrides)))
    return cfg


def given(cfg) -> list[str]:
    """The overrides `cfg` was composed with: what finetune.training.run gets as the command line, as a script does."""
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

    script = str(ROOT / "scripts" / f"{name}.py")
    return _in_process(lambda: runpy.run_path(script, run_name="__main__"), [script, *args], cwd, env)


def run_finetune(*args: str, cwd: Path, env: dict | None = None) -> Finished:
    """The installed `finetune` command with `args` (`train KEY=VALUE ...`), in this process through its entry point
    (finetune.commands.main, what [project.scripts] installs), as run_script runs a script."""
    from finetune.commands import main

    return _in_process(main, ["finetune", *args], cwd, env)


def _in_process(call, argv: list[str], cwd: Path, env: dict | None) -> Finished:
    from hydra.core.global_hydra import GlobalHydra

    saved_argv, here, out, err = sys.argv, os.getcwd(), sys.stdout, sys.stderr
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    captured = io.StringIO()
    sys.argv = argv
    GlobalHydra.instance().clear()
    code = 0
    try:
        os.chdir(cwd)
        sys.stdout = sys.stderr = captured
        call()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv, sys.stdout, sys.stderr = saved_argv, out, err
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


def train(tmp_path: Path, data: Path, *overrides: str, recipe: tuple[str, ...] | list[str] = (),
          name: str = "run") -> tuple[dict, Path]:
    """A training run on the image folder `data` with `recipe` and `overrides`, in this process, given its command
    line as the script gives it; its metrics and its directory, TMP_PATH/NAME. A module binds its recipe once:
    `train = functools.partial(support.train, recipe=...)`."""
    from finetune.training import run

    cfg = compose(tmp_path / name, "dataset=image_folder", f"dataset.root={data}", *recipe, *overrides)
    return run(cfg, overrides=given(cfg)), tmp_path / name


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file with a header, as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def skipped(run_dir: Path) -> dict[str, str]:
    """RUN_DIR/skipped.csv: path -> why it was skipped."""
    return {row["path"]: row["reason"] for row in read_csv(run_dir / "skipped.csv")}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound a moment, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Trained:
    """A finished run: its directory (a copy of its own for each caller), metrics, and what FreezeRecorder saw."""

    run_dir: Path
    metrics: dict
    recorder: object


def trained_once(tmp_path_factory, data: Path, recipe: list[str], cache: dict):
    """A function of a folder: `recipe` trained on `data` the first time (into `cache`, for the session), then a
    copy of that run directory in the folder, so that no test sees what another wrote into its run."""
    import shutil

    from finetune.training import run
    from support.recorders import FreezeRecorder

    def copy_into(folder: Path) -> Trained:
        if "run" not in cache:
            run_dir = tmp_path_factory.mktemp("trained-once") / "run"
            cfg = compose(run_dir, "dataset=image_folder", f"dataset.root={data}", *recipe)
            metrics = run(cfg, overrides=given(cfg))
            # what the recorder saw, not the recorder: Lightning gave it the model's log method, which holds the model
            seen = FreezeRecorder.instances[-1] if FreezeRecorder.instances else None
            cache["run"] = Trained(run_dir, metrics, seen and SimpleNamespace(steps=seen.steps, initial=seen.initial))
        shutil.copytree(cache["run"].run_dir, folder / "run")
        return Trained(folder / "run", dict(cache["run"].metrics), cache["run"].recorder)

    return copy_into
