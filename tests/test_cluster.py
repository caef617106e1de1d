"""resume=auto: the same command again (a requeued job) continues the run its directory holds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONF, FAST, ROOT, compose, given
from omegaconf import OmegaConf

from finetune.config import ConfigError
from finetune.train import run

LEARN = [*FAST, "schedule.lr=3e-3", "schedule.backbone_lr_ratio=0.03", "dataset.val_fraction=0.2",
         "dataset.test_fraction=0.2"]


def start(cwd, *args, module=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, *(["-m", *module] if module else []), str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, process, timeout=300):
    started = time.time()
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() - started < timeout, f"{path} did not appear"
        time.sleep(0.05)


def hydra_config(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.config  # noqa: F401

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", return_hydra_config=True, overrides=list(overrides))


def files(run_dir):
    """Every file of a run with its modification time, but Hydra's own (.hydra/, rewritten by each command) and the
    log (each command appends to it)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


def test_the_same_command_with_resume_auto_continues_the_killed_run_then_says_it_is_finished(tmp_path, shapes, caplog):
    """What a requeued job does: the same command again, in the same directory."""
    run_dir = tmp_path / "job"
    args = ["dataset=image_folder", f"dataset.root={shapes}", *LEARN, "dataset.batch_size=4", "schedule.epochs=3",
            "schedule.freeze_epochs=1", "logger=csv", "resume=auto"]
    first = start(tmp_path, *args, f"hydra.run.dir={run_dir}")
    wait_for(run_dir / "checkpoints" / "last.ckpt", first)  # after the first epoch
    epoch_steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    time.sleep(1.0)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 143, output[-3000:]
    assert "holds no run yet; starting a fresh one" in output
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at > epoch_steps
    config = (run_dir / "config.yaml").read_text()

    again = start(tmp_path, *args, f"hydra.run.dir={run_dir}")
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert f"holds a run; continuing it from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    assert f"(global step {stopped_at})" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["global_step"] == 3 * epoch_steps  # went on, not from step 0
    assert (run_dir / "config.yaml").read_text() == config and "resume: null" in config  # the same run, unchanged
    assert not (tmp_path / "outputs").exists()  # and no run directory of its own beside it

    before = files(run_dir)
    cfg = compose(run_dir, *args)  # a third time, after it finished (in this process: what the script runs)
    with caplog.at_level("INFO", logger="finetune"):
        assert run(cfg, overrides=given(cfg)) == metrics
    assert f"resume=auto: {run_dir} holds a finished run (metrics.json), so there is nothing to do" in caplog.text
    assert files(run_dir) == before  # nothing trained or written again


def test_resume_auto_in_a_directory_without_a_run_starts_a_fresh_one(tmp_path, shapes):
    assert hydra_config("resume=auto").hydra.run.dir.startswith("outputs/runs/")  # not a folder called "auto"
    run_dir = tmp_path / "fresh"
    (run_dir / "checkpoints").mkdir(parents=True)  # a job stopped before its first checkpoint leaves this much
    (run_dir / "config.yaml").write_text("seed: 1\n")
    cfg = compose(run_dir, "dataset=image_folder", f"dataset.root={shapes}", *FAST, "logger=none", "schedule.epochs=1",
                  "resume=auto")
    metrics = run(cfg, overrides=given(cfg))
    assert metrics["epochs"] == 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").resume is None


def test_resume_auto_never_writes_over_checkpoints_it_cannot_continue(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"resume=auto: .* holds best.ckpt but no last.ckpt to continue from.*"
                                          r"`cp .*best.ckpt .*last.ckpt`"):
        run(compose(run_dir, "resume=auto"), overrides=["resume=auto"])
    assert (run_dir / "checkpoints" / "best.ckpt").read_bytes() == b"weights"
