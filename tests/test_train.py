"""Whole training runs on fabricated data: what they learn, what they leave behind, and the freezing facts."""

import csv
import json
from functools import partial

import pytest
import support
import torch
from support import CONF, FAST, compose, given
from support.recipes import PROBE_THEN_UNFREEZE, RECORD_FREEZING, assert_above_chance
from support.recorders import FreezeRecorder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.errors import NonFiniteLoss, WeightsUnavailable
from finetune.models.module import load_module
from finetune.training import run

MARGIN = 8  # images above chance (8 of 24), of test and of validation. Measured over 4 arithmetics x 3 seeds
# (benchmarks/arithmetics.py): test +11 to +14 (median +12), validation +13 to +14
DOGS_MARGIN = 4  # of 16 test images, above chance (8). Measured over 4 arithmetics x 3 seeds: +6 to +8, median +8
SMALL = ["dataset.limit_per_class=16", "calibrate=false"]  # where a test checks bookkeeping, not learning


train = partial(support.train, recipe=FAST)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, colours_run):
    """support.recipes.COLOURS: a frozen phase and an unfreeze, watched by FreezeRecorder."""
    run = colours_run(tmp_path_factory.mktemp("trained"))
    return run.metrics, run.run_dir, run.recorder


@pytest.mark.learning
def test_accuracy_rises_well_above_chance(trained):
    metrics, _, recorder = trained
    assert metrics["epochs"] == 6 and metrics["test_images"] == metrics["val_images"] == 24
    assert_above_chance(metrics, margin=MARGIN, classes=3)  # chance: 8 of 24
    assert_above_chance(metrics, margin=MARGIN, classes=3, key="val/acc_best", images_key="val_images")


def test_frozen_phase_backbone_gets_no_gradient_and_stays_in_eval_mode(trained):
    _, _, recorder = trained
    frozen = [s for s in recorder.steps if s["epoch"] < 3]
    assert frozen
    for step in frozen:
        assert step["with_grad"] == []
        assert step["modules_training"] == []  # BatchNorm and dropout of the backbone in eval mode
        assert step["lr"]["backbone"] == 0.0 and step["lr"]["head"] > 0
        assert torch.equal(step["bn_running_mean"], recorder.initial["bn1.running_mean"])


def test_after_the_unfreeze_the_backbone_trains_at_its_lower_rate(trained):
    _, run_dir, recorder = trained
    thawed = [s for s in recorder.steps if s["epoch"] >= 3]
    assert thawed and all(len(s["with_grad"]) > 100 and "" in s["modules_training"] for s in thawed)
    assert all(0 < s["lr"]["backbone"] < s["lr"]["head"] for s in thawed[1:])
    assert not torch.equal(thawed[-1]["bn_running_mean"], recorder.initial["bn1.running_mean"])
    model = load_module(run_dir / "checkpoints" / "last.ckpt")
    assert not torch.equal(model.backbone.conv_stem.weight, recorder.initial["conv_stem.weight"])


def test_run_directory_holds_everything_needed_afterwards(trained, shapes):
    metrics, run_dir, _ = trained
    config = (run_dir / "config.yaml").read_text()
    assert f"root: {shapes}" in config and "freeze_epochs: 3" in config

    with open(run_dir / "split.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert "not red or green" in {r["label"] for r in rows}

    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"])
    assert saved["best_checkpoint"] == "checkpoints/best.ckpt" and saved["test_images"] == 24
    # 24 validation images are too few to fit a temperature (30): T stays 1, and the test NLL and ECE are reported
    assert saved["val/temperature"] == 1.0 and saved["test/nll_before"] == saved["test/nll_after"] > 0
    assert torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]["temperature"] == 1

    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)  # plain containers only
        hp = checkpoint["hyper_parameters"]
        assert hp["classes"] == ["green", "not red or green", "red"]
        assert hp["preprocessing"]["image_size"] == 32 and len(hp["preprocessing"]["mean"]) == 3
        assert hp["backbone_config"]["name"] == "mobilenetv2_100"
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    best_state = next(v for k, v in best["callbacks"].items() if "val/acc" in k)
    assert saved["val/acc_best"] == pytest.approx(float(best_state["best_model_score"]))


def test_tensorboard_has_curves_per_group_learning_rates_and_hparams(trained):
    _, run_dir, _ = trained
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/loss",
            "lr/backbone", "lr/head"} <= tags
    assert len(events.Scalars("val/acc")) == 6
    assert [e.value for e in events.Scalars("lr/backbone")][0] == 0.0

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["schedule.lr"].number_value == pytest.approx(3e-3)
    assert hparams["backbone"].string_value == "mobilenetv2_100"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/acc", "test/acc"}


def test_a_run_shorter_than_log_every_n_steps_still_logs_its_learning_rates(tmp_path, shapes):
    _, run_dir = train(tmp_path, shapes, "dataset.limit_per_class=12", "schedule.epochs=2", "schedule.freeze_epochs=1",
                       "trainer.log_every_n_steps=50", "calibrate=false")  # 2 steps an epoch
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("lr/head")) >= 2 and len(events.Scalars("train/loss")) >= 2


def test_checkpoint_alone_rebuilds_the_model(trained, shapes):
    _, run_dir, _ = trained
    model = load_module(run_dir / "checkpoints" / "best.ckpt")
    assert model.classes == ["green", "not red or green", "red"] and not model.training
    from PIL import Image

    from finetune.data.transforms import Preprocessing, eval_transform

    pre = Preprocessing(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in model.hparams.preprocessing.items()})
    reds = sorted((shapes / "red").glob("*"))[:8]
    images = torch.stack([eval_transform(pre)(Image.open(p).convert("RGB")) for p in reds])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert (predicted == 2).float().mean() >= 0.5  # red, well above chance, from the checkpoint alone


def test_unfreezing_only_the_last_blocks(tmp_path, shapes):
    train(tmp_path, shapes, "schedule.epochs=2", "schedule.freeze_epochs=1", "schedule.unfreeze=2", RECORD_FREEZING,
          "logger=none")
    steps = [s for s in FreezeRecorder.instances[-1].steps if s["epoch"] == 1]
    assert steps
    for step in steps:
        assert step["with_grad"] and all(n.startswith(("blocks.5.2.", "blocks.6.", "conv_head", "bn2"))
                                          for n in step["with_grad"])
        assert "blocks.5.2.bn1" in step["modules_training"]
        assert "bn1" not in step["modules_training"] and "blocks.0.0.bn1" not in step["modules_training"]


def test_resume_from_a_frozen_checkpoint_unfreezes_at_the_right_epoch(tmp_path, shapes):
    first, run_dir = train(tmp_path, shapes, "schedule.epochs=1", "schedule.freeze_epochs=2", "logger=csv", *SMALL)
    assert first["epochs"] == 1
    cfg = compose(tmp_path / "ignored", f"resume={run_dir}")
    metrics = run(cfg, overrides=["schedule.epochs=4", RECORD_FREEZING])
    steps = FreezeRecorder.instances[-1].steps
    assert sorted({s["epoch"] for s in steps}) == [1, 2, 3]  # continued, not restarted
    assert all(s["with_grad"] == [] for s in steps if s["epoch"] == 1)
    assert all(len(s["with_grad"]) > 100 for s in steps if s["epoch"] >= 2)
    assert metrics["epochs"] == 4 and metrics["global_step"] == 4 * first["global_step"]
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert (run_dir / "csv" / "version_1" / "metrics.csv").is_file()  # the first segment's log is kept
    assert "epochs: 4" in (run_dir / "config.yaml").read_text()
    assert "epochs: 1" in (run_dir / "config.before-resume-1.yaml").read_text()


def test_resume_from_an_unfrozen_checkpoint_stays_unfrozen(tmp_path, shapes):
    _, run_dir = train(tmp_path, shapes, "schedule.epochs=2", "schedule.freeze_epochs=1", "logger=none", *SMALL)
    run(compose(tmp_path / "ignored", f"resume={run_dir}"), overrides=["schedule.epochs=3", RECORD_FREEZING])
    steps = FreezeRecorder.instances[-1].steps
    assert {s["epoch"] for s in steps} == {2}
    assert all(len(s["with_grad"]) > 100 and s["lr"]["backbone"] > 0 for s in steps)


def test_resume_accepts_the_runs_own_groups_and_refuses_real_changes_naming_them(tmp_path, shapes):
    from finetune.errors import ConfigError

    _, run_dir = train(tmp_path, shapes, "schedule.epochs=1", "logger=none", *SMALL)
    with pytest.raises(ConfigError, match=r"backbone=efficientnet_b0 is not it \(backbone.name: mobilenetv2_100 -> "
                                          r"efficientnet_b0\)"):
        changed = ["backbone=efficientnet_b0", f"resume={run_dir}"]
        run(compose(tmp_path / "ignored", *changed), overrides=changed)
    # the same command line again, with resume= appended: its groups and values are the run's own
    again = ["dataset=image_folder", f"dataset.root={shapes}", *FAST, "schedule.epochs=2", "logger=none", *SMALL]
    metrics = run(compose(tmp_path / "ignored", *again, f"resume={run_dir}"), overrides=[*again, f"resume={run_dir}"])
    assert metrics["epochs"] == 2
    assert len(list(run_dir.glob("config.before-resume-*.yaml"))) == 1  # one real change: schedule.epochs


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "schedule").glob("*.yaml")))
def test_a_killed_run_of_every_schedule_preset_resumes_with_the_same_command(tmp_path, shapes, preset):
    """The command that started a run, with resume= appended, continues it: the run's config.yaml holds the preset's
    phases filled with the schema's defaults ({train: head, epochs: 2, lr: null, ...}), and they are the same phases.
    (The run itself is what train.py writes before its first epoch; the process being killed is test_faults'.)"""
    from finetune.errors import ConfigError
    from finetune.runconfig import plan, save_config

    command = ["dataset=image_folder", f"dataset.root={shapes}", "backbone.pretrained=false",
               "dataset.image_size=32", f"schedule={preset}", "schedule.epochs=12"]
    first = compose(tmp_path / "run", *command)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    save_config(plan(first, command).cfg, tmp_path / "run" / "config.yaml")  # as train.py writes it
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"killed after epoch 2")
    again = [*command, f"resume={tmp_path / 'run'}"]
    decided = plan(compose(tmp_path / "other", *again), again)
    assert decided.resuming and decided.changes == []
    assert decided.cfg.schedule.phases == first.schedule.phases
    longer = [*command, "schedule.epochs=20", f"resume={tmp_path / 'run'}"]  # a single value after the preset: a change
    assert plan(compose(tmp_path / "other", *longer), longer).changes == ["schedule.epochs=20"]
    other = "gradual" if preset != "gradual" else "default"
    with pytest.raises(ConfigError, match=f"schedule={other} is not it"):
        changed = [*command, f"schedule={other}", f"resume={tmp_path / 'run'}"]
        plan(compose(tmp_path / "other", *changed), changed)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shapes):
    with pytest.raises(NonFiniteLoss, match="NaN or infinite .* last good checkpoint is .*last.ckpt"):
        train(tmp_path, shapes, "schedule.epochs=3", "logger=none",
              "callbacks.extra=[{_target_: support.recorders.PoisonHead, epoch: 1}]")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_pretrained_weights_missing_stops_before_the_data_is_read(tmp_path, shapes):
    with pytest.raises(WeightsUnavailable):
        train(tmp_path, shapes, "backbone.pretrained=true")
    assert not (tmp_path / "run" / "split.csv").exists()


def test_local_weights_file_starts_the_backbone(tmp_path, shapes):
    import timm

    source = timm.create_model("mobilenetv2_100")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    train(tmp_path, shapes, f"backbone.weights={tmp_path / 'w.pth'}", "schedule.epochs=1", RECORD_FREEZING,
          "logger=none")
    assert torch.equal(FreezeRecorder.instances[-1].initial["conv_stem.weight"], source.conv_stem.weight)


def test_debug_fast_runs_one_batch_of_each_loop(tmp_path, shapes):
    metrics, run_dir = train(tmp_path, shapes, "debug=fast")
    assert metrics["global_step"] == 1 and "test/acc" in metrics
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.learning
def test_dogs_vs_cats_trains_from_its_kaggle_layout(tmp_path, dogs_vs_cats):
    cfg = compose(tmp_path / "run", "dataset=dogs_vs_cats", f"dataset.root={dogs_vs_cats}", *PROBE_THEN_UNFREEZE,
                  "schedule.epochs=6", "schedule.freeze_epochs=3", "logger=none")
    metrics = run(cfg, overrides=given(cfg))
    with open(tmp_path / "run" / "split.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and not any("test1" in r["path"] for r in rows)
    assert {r["label"] for r in rows} == {"cat", "dog"} and metrics["test_images"] == 16
    assert_above_chance(metrics, margin=DOGS_MARGIN, classes=2)  # the labels reached training: chance is 8 of 16
