"""Bad input and real faults end in one clear line or the right behaviour: damaged checkpoints, a run directory
given as a checkpoint, infinite values, weights that turn NaN, caches holding the wrong thing, home-folder paths,
the learning-rate finder with the default logger."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FAST, ROOT, compose, given

from finetune.callbacks.nonfinite import NonFiniteLoss
from finetune.config import ConfigError, FinetuneError, validate
from finetune.models.classifier import load_checkpoint, load_classifier, resolve_checkpoint
from finetune.train import run

TINY = [*FAST, "schedule.epochs=2", "schedule.freeze_epochs=1", "dataset.val_fraction=0.2",
        "dataset.test_fraction=0.2"]


def script(name, cwd, *args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose(run_dir, "dataset=image_folder", f"dataset.root={shapes}", *TINY, "logger=none")
    return run_dir, run(cfg, overrides=given(cfg))


def test_damaged_checkpoints_are_named_for_what_they_are(tmp_path, trained):
    run_dir, _ = trained
    good = (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    cases = {"empty.ckpt": b"", "truncated.ckpt": good[: len(good) // 2], "notes.ckpt": b"my notes, not weights\n"}
    messages = {"empty.ckpt": "is empty (0 bytes)", "truncated.ckpt": "is not a PyTorch checkpoint",
                "notes.ckpt": "is not a PyTorch checkpoint"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FinetuneError, match=messages[name]) as error:
            load_checkpoint(tmp_path / name)
        assert "pickle" not in str(error.value)
    with pytest.raises(FinetuneError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")
    # and as a user meets it: evaluate, predict and export each say it in one line, exit status 2
    for tool, args in (("evaluate", []), ("predict", [f"inputs={tmp_path}"]), ("export", [])):
        result, output = script(tool, tmp_path, f"ckpt={tmp_path / 'truncated.ckpt'}", *args)
        assert result.returncode == 2 and "is not a PyTorch checkpoint" in output and "Traceback" not in output, \
            (tool, output[-2000:])


def test_resume_with_a_damaged_last_checkpoint_names_an_intact_one(tmp_path, trained, shapes):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(FinetuneError, match=r"best.ckpt is intact: continue from it with `cp .*best.ckpt .*last.ckpt"):
        run(compose(tmp_path / "ignored", f"resume={copy}"), overrides=[])


def test_a_run_directory_is_taken_as_its_best_checkpoint(tmp_path, trained, shapes):
    run_dir, _ = trained
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoints" / "best.ckpt"
    with pytest.raises(FinetuneError, match="without checkpoints/best.ckpt"):
        resolve_checkpoint(tmp_path)
    result, output = script("predict", tmp_path, f"ckpt={run_dir}", f"inputs={shapes / 'red'}",
                            f"out={tmp_path / 'p.csv'}", "device=cpu")
    assert result.returncode == 0, output[-2000:]
    assert (tmp_path / "p.csv").read_text().count("\n") > 40


def test_home_folder_paths_work_on_the_command_line(tmp_path, shapes):
    """README writes dataset.root=~/data/...: bash leaves that `~` alone and Hydra's grammar cannot parse it."""
    home = tmp_path / "home"
    shutil.copytree(shapes, home / "data" / "shapes")
    result, output = script("train", tmp_path, "dataset=image_folder", "dataset.root=~/data/shapes", *FAST,
                            "debug=fast", "logger=none", env={"HOME": str(home)})
    assert result.returncode == 0, output[-3000:]
    split = next((tmp_path / "outputs" / "runs").iterdir()) / "split.csv"
    assert str(home / "data" / "shapes" / "red") in split.read_text()


@pytest.mark.parametrize("key", ["schedule.lr", "schedule.weight_decay", "schedule.backbone_lr_ratio",
                                 "augment.mixup", "dataset.val_fraction"])
def test_infinite_and_nan_values_are_refused(tmp_path, key):
    for value in ("inf", "nan"):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            validate(compose(tmp_path, f"{key}={value}"))


def test_weights_that_turn_nan_in_a_one_step_epoch_never_reach_a_checkpoint(tmp_path, shapes):
    """A huge learning rate: the first step's loss is finite, its update is not. One step an epoch, so no later
    training loss shows it before the epoch's checkpoints; the validation loss does."""
    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *TINY, "dataset.batch_size=128",
                  "schedule.freeze_epochs=0", "schedule.lr=1e30", "schedule.warmup_epochs=0", "logger=none")
    with pytest.raises(NonFiniteLoss, match="NaN or infinite"):
        run(cfg, overrides=given(cfg))
    for saved in (tmp_path / "run").glob("checkpoints/*.ckpt"):
        state = torch.load(saved, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), saved
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_checkpoint_with_nan_weights_is_refused_by_the_tools(tmp_path, trained):
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["state_dict"]["head.1.weight"].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(FinetuneError, match="NaN or infinite weights"):
        load_classifier(tmp_path / "nan.ckpt")


@pytest.mark.parametrize("content", ["null", "[]", '{"version": 1, "max_pixels": 100000000, "files": null}',
                                     '{"version": 1, "max_pixels": 100000000, "files": {"x": "y"}}', '"text"'])
def test_a_scan_cache_holding_the_wrong_json_is_treated_as_absent(tmp_path, content):
    from fabricate import make_image_folder

    from finetune.data.integrity import CACHE_NAME, scan

    root = make_image_folder(tmp_path / "data", {"red": "red", "blue": "blue"}, per_class=3)
    (root / CACHE_NAME).write_text(content)
    result = scan(sorted(str(p) for p in root.rglob("*.jpg")), root, 10**8)
    assert result.bad == [] and result.checked == 6
    assert json.loads((root / CACHE_NAME).read_text())["version"] == 1  # rewritten


def test_a_cache_dir_that_is_a_file_and_a_gpu_trainer_without_a_gpu_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="dataset.cache_dir=.* is a file, not a folder"):
        validate(compose(tmp_path, f"dataset.cache_dir={tmp_path / 'file'}"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu, but this machine has no CUDA GPU"):
            validate(compose(tmp_path, "trainer=gpu"))


def test_a_schedule_the_backbone_never_trains_in_is_warned_about(tmp_path, shapes, caplog):
    with caplog.at_level("WARNING", logger="finetune"):
        cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "schedule.epochs=1",
                      "schedule.freeze_epochs=2", "schedule.warmup_epochs=3", "logger=none", "debug=fast")
        run(cfg, overrides=given(cfg))
    assert "the backbone stays frozen for all schedule.epochs=1 epochs" in caplog.text
    assert "schedule.warmup_epochs=3 is longer than schedule.epochs=1" in caplog.text


def test_lr_find_with_the_default_logger_trains(tmp_path, shapes):
    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *TINY, "tune.lr_find=true",
                  "tune.steps=20", "tune.early_stop_threshold=null")
    metrics = run(cfg, overrides=given(cfg))
    assert metrics["epochs"] == 2 and (tmp_path / "run" / "lr_find.png").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
