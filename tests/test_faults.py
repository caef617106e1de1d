"""Runs that survive faults: atomic checkpoints under SIGKILL, SIGKILL then resume (SIGTERM then resume is
test_cluster's), NaN losses, fp16 overflow, and deterministic reruns."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from support import FAST, compose, given, start_process, wait_for
from support.recipes import PROBE_THEN_UNFREEZE, assert_above_chance

from finetune.errors import NonFiniteLoss
from finetune.training import run


def start_training(cwd, *args):
    return start_process("train", *args, cwd=cwd)


@pytest.mark.slow  # three processes, each importing torch and Lightning
def test_sigkill_during_a_save_never_damages_last_ckpt(tmp_path):
    """A process saving 60 MB checkpoints back to back is killed at moments spread over its saves; each time
    last.ckpt is whole and loadable, and nothing else is left in the folder."""
    writer = tmp_path / "writer.py"
    writer.write_text(textwrap.dedent(f"""
        import sys, torch
        from finetune.checkpoints import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        version = 0
        while True:
            io.save_checkpoint({{"version": version, "weights": torch.full((15_000_000,), float(version))}},
                               "{tmp_path}/ckpts/last.ckpt")
            print(version, flush=True)
            version += 1
    """))
    for delay in (0.05, 0.3):
        process = subprocess.Popen([sys.executable, str(writer)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "0"  # one whole checkpoint exists
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert os.listdir(tmp_path / "ckpts") == ["last.ckpt"]
        checkpoint = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
        assert torch.all(checkpoint["weights"] == checkpoint["version"])


GRADUAL = ["schedule=gradual", "schedule.layer_decay=0.8",
           "schedule.phases=[{train: head, epochs: 2}, {train: 2, epochs: 1}, {train: 6, epochs: 1}, {train: all}]"]


# test images above chance (8 of 24), of either run. Measured over 4 arithmetics x 3 seeds (benchmarks/
# arithmetics.py): +8 to +14, median +12
MARGIN = 6


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("schedule", [GRADUAL], ids=["gradual"])  # the default's two phases: test_cluster's SIGTERM
def test_sigkill_then_resume_finishes_close_to_an_uninterrupted_run(tmp_path, shapes, schedule):
    args = ["dataset=image_folder", f"dataset.root={shapes}", *PROBE_THEN_UNFREEZE, "schedule.epochs=6", *schedule,
            "logger=none"]
    (tmp_path / "a").mkdir()
    process = start_training(tmp_path / "a", *args)
    runs = tmp_path / "a" / "outputs" / "runs"
    wait_for(runs, process)
    run_dir = next(runs.iterdir())
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "metrics.json").exists()
    resumed = start_training(tmp_path / "a", f"resume={run_dir}")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    interrupted = json.loads((run_dir / "metrics.json").read_text())

    (tmp_path / "b").mkdir()
    straight = start_training(tmp_path / "b", *args)
    assert straight.wait(timeout=600) == 0
    reference = json.loads(next((tmp_path / "b" / "outputs" / "runs").iterdir()).joinpath("metrics.json").read_text())
    assert interrupted["epochs"] == reference["epochs"] == 6
    assert interrupted["global_step"] == reference["global_step"]
    assert abs(interrupted["test/acc"] - reference["test/acc"]) <= 0.2  # measured: 0 to 2 of 24 images apart
    assert_above_chance(interrupted, margin=MARGIN, classes=3)  # chance: 8 of 24
    assert_above_chance(reference, margin=MARGIN, classes=3)


def test_no_checkpoint_of_a_nan_model_even_with_step_checkpoints(tmp_path, shapes):
    with pytest.raises(NonFiniteLoss):
        run(compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "schedule.epochs=3",
                    "logger=none", "checkpoint.every_n_steps=1",
                    "callbacks.extra=[{_target_: support.recorders.PoisonHead, epoch: 1}]"), overrides=[])
    for name in ("last.ckpt", "best.ckpt"):
        state = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


def test_skipped_fp16_steps_are_counted():
    """GradScaler (as Lightning's 16-mixed uses it) skips a step whose gradients overflowed: counted, no sync."""
    from types import SimpleNamespace

    from finetune.callbacks.mixed_precision import CountSkippedSteps

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    counter = CountSkippedSteps()
    for poison in (False, True, False, True, True):
        counter.on_train_batch_start(trainer, None, None, 0)
        loss = model(torch.ones(2, 3)).sum() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        counter.on_train_batch_end(trainer, None, None, None, 0)
    assert int(counter.skipped) == 3


def test_same_seed_deterministic_runs_give_identical_results(tmp_path, shapes):
    results = []
    for name in ("a", "b"):
        cfg = compose(tmp_path / name, "dataset=image_folder", f"dataset.root={shapes}", *PROBE_THEN_UNFREEZE,
                      "schedule.epochs=3", "schedule.freeze_epochs=1", "trainer.deterministic=true", "logger=none",
                      "seed=7")
        results.append(run(cfg, overrides=given(cfg)))
    assert {k: results[0][k] for k in ("test/acc", "test/loss", "val/acc_best")} == \
           {k: results[1][k] for k in ("test/acc", "test/loss", "val/acc_best")}
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
