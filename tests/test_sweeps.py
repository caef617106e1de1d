"""Sweeps that report, the learning-rate finder, and DDP on CPU (SLURM: test_cluster.py)."""

import csv
import gc
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from support import FAST, compose, run_process, run_script
from support.recipes import TWO_EPOCHS, assert_agree

from finetune.data.pipeline import apply_split_file
from finetune.data.readers import read_source
from finetune.inference import probabilities
from finetune.models.module import load_module
from finetune.training import run


def train_script(cwd, *args, env=None, timeout=600):
    """scripts/train.py in this process; with trainer=ddp on two devices, a real process (Lightning starts the
    second rank by running the command again)."""
    if "trainer.devices=2" in args and "-m" not in args:
        return run_process("train", *args, cwd=cwd, env=env, timeout=timeout)
    return run_script("train", *args, cwd=cwd, env=env)


def summary(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_failed_jobs_are_recorded_the_others_run_and_the_sweep_exits_nonzero(tmp_path, shapes):
    """Three jobs: a bad value, a good run, and a learning rate that makes the loss NaN."""
    result = train_script(tmp_path, "-m", "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                          "schedule.freeze_epochs=0", "schedule.lr=-1,3e-3,1e12")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    rows = summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "failed", "failed"]  # best first, failures last
    good, *failed = rows
    assert float(good["overrides"].rsplit("schedule.lr=", 1)[1]) == 3e-3 and float(good["val_acc_best"]) > 0
    assert int(good["epochs"]) == 2 and float(good["wall_time_s"]) > 0
    errors = {float(r["overrides"].rsplit("schedule.lr=", 1)[1]): r["error"] for r in failed}
    assert "schedule.lr must be > 0" in errors[-1]
    assert "NaN or infinite" in errors[1e12]
    assert "| failed: schedule.lr must be > 0" in (sweep / "summary.md").read_text()
    best = [line for line in result.stdout.splitlines() if line.startswith("Best job")]
    assert len(best) == 1 and best[0].startswith("Best job (1, val/acc_best") and best[0].endswith(good["overrides"])
    assert "2 of 3 jobs failed: job 0: schedule.lr must be > 0" in output


def test_jobs_of_a_sweep_leave_no_model_or_data_behind(tmp_path, shapes):
    from finetune.data.datamodule import ImageDataModule
    from finetune.models.module import ImageModule

    def alive(kind):
        gc.collect()
        return sum(isinstance(o, kind) for o in gc.get_objects())

    for i in range(2):  # one epoch of a few images each: what is left after a job is the question, not learning
        run(compose(tmp_path / f"job{i}", "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "logger=none",
                    "schedule.epochs=1", "schedule.freeze_epochs=0", "dataset.limit_per_class=12", "calibrate=false"),
            overrides=[])
        assert alive(ImageModule) == 0 and alive(ImageDataModule) == 0


def test_lr_find_plots_and_uses_its_suggestion_unless_lr_is_given(tmp_path, shapes):
    base = ["dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "tune.lr_find=true", "tune.steps=20",
            "tune.early_stop_threshold=null", "schedule.epochs=1", "schedule.freeze_epochs=0", "calibrate=false"]
    (tmp_path / "found").mkdir()
    (tmp_path / "found" / ".lr_find_0a1b.ckpt").write_bytes(b"left by a finder stopped with SIGTERM")
    run(compose(tmp_path / "found", *base), overrides=[])  # with the default logger (TensorBoard)
    found = OmegaConf.load(tmp_path / "found" / "config.yaml").schedule.lr
    assert (tmp_path / "found" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "found").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "found").glob(".lr_find_*"))  # the dead finder's copy and its own, removed
    assert found != 1e-3
    best = torch.load(tmp_path / "found" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["hyper_parameters"]["schedule"]["lr"] == pytest.approx(found)
    run(compose(tmp_path / "given", *base, "logger=none", "schedule.lr=0.002"), overrides=["schedule.lr=0.002"])
    assert OmegaConf.load(tmp_path / "given" / "config.yaml").schedule.lr == 0.002
    assert (tmp_path / "given" / "lr_find.png").exists()


def test_multirun_with_ddp_is_refused_up_front(tmp_path, shapes):
    result = train_script(tmp_path, "-m", "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "trainer=ddp",
                          "trainer.accelerator=cpu", "trainer.devices=2", "schedule.lr=1e-3,3e-3")
    assert result.returncode == 1
    rows = summary(next((tmp_path / "outputs" / "sweeps").iterdir()))
    assert len(rows) == 2 and all("re-running the command" in r["error"] for r in rows)
    assert not list(tmp_path.glob("outputs/sweeps/*/*/checkpoints"))


@pytest.mark.slow
def test_optuna_search_maximises_val_acc(tmp_path, shapes):
    result = train_script(tmp_path, "hparams_search=lr_optuna", "hydra.sweeper.n_trials=3", "dataset=image_folder",
                          f"dataset.root={shapes}", *TWO_EPOCHS, "logger=none")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = summary(next((tmp_path / "outputs" / "sweeps").iterdir()))
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert "Best value:" in result.stdout + result.stderr
    assert all("schedule.lr=" in r["overrides"] and "schedule.backbone_lr_ratio=" in r["overrides"] for r in rows)


@pytest.mark.slow
def test_ddp_on_cpu_one_run_directory_and_identical_ranks_across_the_unfreeze(tmp_path, shapes):
    result = train_script(tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *FAST, "trainer=ddp",
                          "trainer.accelerator=cpu", "trainer.devices=2", "schedule.epochs=3",
                          "schedule.freeze_epochs=1", "schedule.lr=3e-3", "schedule.backbone_lr_ratio=0.1",
                          "callbacks.extra=[{_target_: support.recorders.RankWeights}]", timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1  # not one per process
    run_dir = runs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 1 and not list(run_dir.glob("*/events.out*"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["epoch"] for e in ranks[0]] == [0, 1, 2] and ranks[0][0]["trainable"] == 0  # frozen first
    assert ranks[0][1]["trainable"] > 100  # then unfrozen
    for a, b in zip(*ranks):
        assert a["sum"] == b["sum"] and a["first"] == b["first"], (a, b)  # identical weights on both ranks
    assert ranks[0][2]["sum"] != ranks[0][0]["sum"]  # and they did train

    # metrics aggregated over both ranks: test/acc is the accuracy on the whole test split, as one process sees it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    d = OmegaConf.load(run_dir / "config.yaml").dataset
    source = apply_split_file(read_source(d.name, d.root), run_dir / "split.csv")
    test = np.flatnonzero(np.array(source.splits) == "test")
    probs, _ = probabilities(load_module(run_dir / "checkpoints" / "best.ckpt"), source, test)
    assert metrics["test_images"] == len(test)  # each image once, not padded to the ranks' share
    assert_agree(metrics["test/acc"], float((probs.argmax(1) == source.labels[test]).mean()), images=len(test))
