"""Bad input and real faults end in one clear line or the right behaviour: damaged checkpoints, a run directory
given as a checkpoint, infinite values, weights that turn NaN, caches holding the wrong thing, home-folder paths,
the learning-rate finder with the default logger."""

import json
import os
import shutil

import pytest
import torch
from support import FAST, ROOT, compose, given, run_script, start_process
from support.fabricate import make_image_folder
from support.recipes import TWO_EPOCHS, assert_agree

from finetune.checks import validate
from finetune.errors import ConfigError, FinetuneError, NonFiniteLoss
from finetune.models.module import load_checkpoint, load_module, resolve_checkpoint
from finetune.training import run


def script(name, cwd, *args, env=None):
    result = run_script(name, *args, cwd=cwd, env=env)
    return result, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, colours_run):
    run = colours_run(tmp_path_factory.mktemp("trained"))
    return run.run_dir, run.metrics


def test_damaged_checkpoints_are_named_for_what_they_are(tmp_path, trained, shapes):
    run_dir, _ = trained
    good = (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    cases = {"empty.ckpt": b"", "truncated.ckpt": good[: len(good) // 2], "notes.ckpt": b"my notes, not weights\n"}
    messages = {"empty.ckpt": r"is empty \(0 bytes\)", "truncated.ckpt": "is not a PyTorch checkpoint",
                "notes.ckpt": "is not a PyTorch checkpoint"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FinetuneError, match=messages[name]) as error:
            load_checkpoint(tmp_path / name)
        assert "pickle" not in str(error.value)
    with pytest.raises(FinetuneError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_from_every_tool(tmp_path, trained, shapes):
    run_dir, _ = trained
    good = (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    for tool, args in (("evaluate", []), ("predict", [f"inputs={shapes / 'red'}"]), ("export", [])):
        result, output = script(tool, tmp_path, f"ckpt={tmp_path / 'truncated.ckpt'}", *args)
        assert result.returncode == 2 and "is not a PyTorch checkpoint" in output and "Traceback" not in output, \
            (tool, output[-2000:])


def test_resume_with_a_damaged_last_checkpoint_names_an_intact_one(tmp_path, trained, shapes):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.json").unlink()  # a run stopped before its end
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(FinetuneError, match=r"best.ckpt is intact: continue from it with `cp .*best.ckpt .*last.ckpt"):
        run(compose(tmp_path / "ignored", f"resume={copy}"), overrides=[])


@pytest.mark.slow
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
    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                  "dataset.batch_size=128", "schedule.freeze_epochs=0", "schedule.lr=1e30", "schedule.warmup_epochs=0",
                  "logger=none")
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
        load_module(tmp_path / "nan.ckpt")


@pytest.mark.parametrize("content", ["null", "[]", '{"version": 1, "max_pixels": 100000000, "files": null}',
                                     '{"version": 1, "max_pixels": 100000000, "files": {"x": "y"}}', '"text"'])
def test_a_scan_cache_holding_the_wrong_json_is_treated_as_absent(tmp_path, content):
    from support.fabricate import make_image_folder

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


def test_a_fresh_run_never_writes_over_a_finished_one(tmp_path, trained, shapes):
    run_dir, _ = trained
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    cfg = compose(run_dir, "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "logger=none")
    with pytest.raises(ConfigError, match=f"{run_dir} already holds a run .*continue it with resume={run_dir}"):
        run(cfg, overrides=given(cfg))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    # the command as a user types it: refused before Hydra writes its .hydra/ and train.log there
    result, output = script("train", tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                            f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and output.strip().endswith("give the new run another hydra.run.dir")
    assert len(output.strip().splitlines()) == 1, output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / ".hydra").exists() and not (run_dir / "train.log").exists()


def test_resume_refuses_another_runs_checkpoint_naming_both(tmp_path, trained):
    from support.fabricate import make_image_folder

    run_dir, _ = trained
    other_data = make_image_folder(tmp_path / "two", {"cat": "red", "dog": "blue"}, per_class=20)
    cfg = compose(tmp_path / "other", "dataset=image_folder", f"dataset.root={other_data}", *TWO_EPOCHS, "logger=none",
                  "schedule.epochs=1")
    run(cfg, overrides=given(cfg))
    mine = tmp_path / "mine"
    shutil.copytree(run_dir, mine)
    (mine / "metrics.json").unlink()  # stopped before its end: there is something to resume
    shutil.copy(tmp_path / "other" / "checkpoints" / "last.ckpt", mine / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"last.ckpt is not this run's checkpoint: it holds mobilenetv2_100 for 2 "
                                          r"classes \(cat, dog\), the run is mobilenetv2_100 for 3"):
        run(compose(tmp_path / "ignored", f"resume={mine}"), overrides=[])


def test_a_full_disk_while_saving_is_named_and_the_earlier_checkpoint_stays(tmp_path, monkeypatch):
    import errno

    import finetune.checkpoints as checkpoints

    io = checkpoints.AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, tmp_path / "ckpts" / "last.ckpt")
    for error in (RuntimeError("[enforce fail at inline_container.cc:671] unexpected pos 123 vs 456"),
                  OSError(errno.ENOSPC, "No space left on device")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(checkpoints.torch, "save", fail)
        with pytest.raises(FinetuneError, match=r"No space left on the device while saving .*last.ckpt \(\d+ MB free "
                                                r"there\): the checkpoints written before are intact"):
            io.save_checkpoint({"epoch": 2}, tmp_path / "ckpts" / "last.ckpt")
        monkeypatch.undo()
        assert os.listdir(tmp_path / "ckpts") == ["last.ckpt"]
        assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True) == {"epoch": 1}


def test_ctrl_c_in_the_middle_of_a_save_is_an_interrupt_not_a_full_disk(tmp_path, monkeypatch):
    """Seen once in CI: Ctrl-C while torch.save wrote last.ckpt; torch's zip writer then failed its write ('unexpected
    pos') while the KeyboardInterrupt unwound, and the run said 'No space left on the device' with 66 GB free and
    exit status 2. It is the interrupt (Lightning then stops the run: one line, 130), and last.ckpt stays."""
    import finetune.checkpoints as checkpoints

    io = checkpoints.AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, tmp_path / "ckpts" / "last.ckpt")

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, tmp_path / "ckpts" / "last.ckpt")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "ckpts") == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True) == {"epoch": 1}


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_is_one_line_and_exit_status_130_every_time(tmp_path, shapes):
    """Ctrl-C as a terminal sends it, to the command's whole process group (its data workers too): during the
    integrity scan with workers, twice, and during training with num_workers=2, twice at different moments.
    Each time the one-line message and status 130; no traceback, no hang, no 'DataLoader worker exited'."""
    import time

    from support import Output, ctrl_c

    large = tmp_path / "large"  # a scan that takes seconds: 400 PNGs of 1000x1000 (26 ms each to check here)
    make_image_folder(large, {"red": "red", "green": "green"}, per_class=1, size=(1000, 1000), ext=".png",
                      scenes=True)
    for png in list(large.glob("*/*.png")):
        for i in range(1, 200):
            shutil.copy(png, png.with_name(f"{i:04d}.png"))
    for attempt in range(2):
        (large / ".finetune-scan.json").unlink(missing_ok=True)
        (tmp_path / f"scan{attempt}").mkdir()
        out = Output(start_process("train", "dataset=image_folder", f"dataset.root={large}", *TWO_EPOCHS,
                                   "dataset.num_workers=2", "logger=none", cwd=tmp_path / f"scan{attempt}",
                                   group=True))
        out.wait_for("Integrity scan: decoding")
        time.sleep(0.5 * attempt)
        ctrl_c(out.process)
        output = out.end(timeout=60)
        assert out.process.returncode == 130, output[-3000:]
        assert "Interrupted (Ctrl-C)" in output and "Traceback" not in output, output[-3000:]
    for attempt, delay in enumerate((0.0, 1.0)):
        cwd = tmp_path / f"train{attempt}"
        cwd.mkdir()
        out = Output(start_process("train", "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                                   "schedule.epochs=30", "dataset.num_workers=2", "logger=none", cwd=cwd, group=True))
        started = time.time()
        while not list(cwd.glob("outputs/runs/*/checkpoints/last.ckpt")):
            assert out.process.poll() is None and time.time() - started < 300, "".join(out.lines)[-3000:]
            time.sleep(0.05)
        time.sleep(delay)
        ctrl_c(out.process)
        output = out.end(timeout=120)
        assert out.process.returncode == 130, (attempt, output[-3000:])
        assert "Interrupted (Ctrl-C) in epoch" in output and "Nothing was lost" in output and "resume=" in output
        assert "Traceback" not in output and "exited unexpectedly" not in output, (attempt, output[-3000:])
        torch.load(next(cwd.glob("outputs/runs/*/checkpoints/last.ckpt")), weights_only=True)  # whole


@pytest.mark.slow
def test_evaluate_needs_only_the_split_it_evaluates_and_follows_a_moved_dataset(tmp_path, shapes):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={data}", *TWO_EPOCHS, "logger=none",
                  "schedule.epochs=1")
    metrics = run(cfg, overrides=given(cfg))
    rows = (tmp_path / "run" / "split.csv").read_text().splitlines()[1:]
    gone = [row.split(",")[0] for row in rows if row.endswith(",train")][:3]
    for path in gone:
        os.remove(path)
    result, output = script("evaluate", tmp_path, f"ckpt={tmp_path / 'run'}", "num_workers=0")
    assert result.returncode == 0, output[-3000:]
    assert "3 images of" in output and "outside its test split are not in the dataset any more" in output
    evaluated = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert evaluated["images"] == metrics["test_images"]
    assert_agree(evaluated["accuracy"], metrics["test/acc"], images=metrics["test_images"])
    shutil.move(data, tmp_path / "moved")  # the dataset moved: evaluate reads the run's split from its new folder
    result, output = script("evaluate", tmp_path, f"ckpt={tmp_path / 'run'}", "num_workers=0")
    assert result.returncode == 2 and "if the dataset moved, give its new folder with root=DIR" in output, output
    result, output = script("evaluate", tmp_path, f"ckpt={tmp_path / 'run'}", "num_workers=0",
                            f"root={tmp_path / 'moved'}")
    assert result.returncode == 0, output[-3000:]
    again = json.loads((tmp_path / "run" / "eval-2" / "metrics.json").read_text())
    assert again["accuracy"] == evaluated["accuracy"] and again["images"] == evaluated["images"]


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path, shapes):
    env = {"PYTHONPATH": str(ROOT / "tests")}
    result, output = script("train", tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                            "logger=none", "callbacks.extra=[{_target_: support.recorders.Boom}]", env=env)
    assert result.returncode == 1, output[-3000:]
    assert "Unexpected error: RuntimeError: boom: something nobody foresaw" in output
    assert "Traceback" not in output
    log_file = next((tmp_path / "outputs" / "runs").iterdir()) / "train.log"
    assert f"The full traceback is in {log_file}" in output
    assert "Traceback (most recent call last)" in log_file.read_text() and "boom" in log_file.read_text()


def test_a_local_dir_backbone_trains_offline_and_its_checkpoint_needs_nothing_else(tmp_path, shapes):
    import timm

    torch.manual_seed(7)
    timm.models.save_for_hf(timm.create_model("mobilenetv2_100.ra_in1k"), tmp_path / "my-backbone",
                            safe_serialization=True)
    result, output = script("train", tmp_path, "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS,
                            "schedule.epochs=1", "dataset.limit_per_class=8", "logger=none",
                            f"backbone.name=local-dir:{tmp_path / 'my-backbone'}",
                            "backbone.pretrained=true", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, output[-3000:]
    ckpt = next((tmp_path / "outputs" / "runs").iterdir()) / "checkpoints" / "best.ckpt"
    shutil.rmtree(tmp_path / "my-backbone")  # the checkpoint alone rebuilds the model
    model = load_module(ckpt)
    assert model.hparams.backbone_config["architecture"] == "mobilenetv2_100"
    assert model.hparams.preprocessing["image_size"] == 32


def test_a_run_directory_is_held_by_one_run_at_a_time(tmp_path, shapes):
    """Two trainings into one hydra.run.dir: the second is refused, naming the run that holds the directory, and
    writes nothing there (nor does Hydra: no .hydra/, no train.log); once the first ends the directory is free
    again (the lock goes with its process)."""
    from finetune import rundir

    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    command = ["dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "logger=none", f"hydra.run.dir={run_dir}"]
    with rundir.held(run_dir, "the first training"):
        before = sorted(p.name for p in run_dir.rglob("*"))
        second, output = script("train", tmp_path, *command)
        assert second.returncode == 2
        assert f"{run_dir} is being written by another run (pid {os.getpid()} on " in output
        assert "the first training): wait for it to end, or give this run another hydra.run.dir" in output
        assert "Traceback" not in output
        assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written, by finetune or Hydra
    assert not (run_dir / rundir.LOCK).exists()  # released and removed
    with rundir.held(run_dir):  # and taken again
        assert "pid" in (run_dir / rundir.LOCK).read_text()


def test_resume_with_another_dataset_root_is_a_moved_dataset_or_a_refusal_that_writes_nothing(tmp_path, trained,
                                                                                             shapes):
    """resume=RUN dataset.root=ELSEWHERE: where ELSEWHERE holds the run's images (the dataset moved) the run goes
    on; where it does not, one line says so, naming both folders, and the run is left exactly as it was."""
    run_dir, metrics = trained
    longer = f"schedule.epochs={metrics['epochs'] + 1}"  # a finished run, resumed for one epoch more
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    other = make_image_folder(tmp_path / "other", {"red": "red", "green": "green", "not red or green": "blue"},
                              per_class=10)  # the run's classes, fewer images: not the run's dataset
    result, output = script("train", tmp_path, f"resume={copy}", f"dataset.root={other}", longer)
    assert result.returncode != 0 and "Traceback" not in output
    assert f"the run's dataset was in {shapes}, and dataset.root={other} does not hold the same images" in output
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and ".hydra" not in p.parts
             and "resumed" not in p.parts}  # each resume command's own log: RUN/resumed/TIME/train.log
    assert after == before  # no config.before-resume-1.yaml, config.yaml as it was
    moved = tmp_path / "moved"
    shutil.copytree(shapes, moved)
    result, output = script("train", tmp_path, f"resume={copy}", f"dataset.root={moved}", longer)
    assert result.returncode == 0, output[-3000:]
    assert json.loads((copy / "metrics.json").read_text())["epochs"] == metrics["epochs"] + 1
    assert f"root: {moved}" in (copy / "config.yaml").read_text()


def test_weights_that_are_not_weights_or_not_this_backbones_are_one_line_saying_which(tmp_path, shapes):
    import timm

    notes = tmp_path / "notes.pth"
    notes.write_text("my notes on the run\n")
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), other)
    command = ["dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, "logger=none"]
    result, output = script("train", tmp_path, *command, f"backbone.weights={notes}")
    assert result.returncode == 2 and "Traceback" not in output
    assert f"backbone.weights={notes} is not a weights file (it begins with 'my notes on ', like a text file)" in output
    assert "pickle" not in output
    result, output = script("train", tmp_path, *command, f"backbone.weights={other}")
    assert result.returncode == 2 and "Traceback" not in output
    assert f"backbone.weights={other} does not load into backbone.name=mobilenetv2_100: these are the weights of " \
           "another architecture (" in output and "give the backbone.name they were saved from" in output
    assert len([line for line in output.splitlines() if "ERROR" in line]) == 1 and "Missing key(s)" not in output
