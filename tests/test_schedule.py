"""The fine-tuning schedule: phases, what trains in each, every group's rate at every step, early phase ends,
restored weights, EMA, the from-scratch default, and the two-phase shorthand reproducing the previous release."""

import csv
import json
import math
from functools import partial

import pytest
import support
import torch
from support import FAST, compose, run_process, run_script
from support.recipes import FIFTHS, RECORD_FREEZING, assert_above_chance, assert_agree
from support.recorders import BatchKinds, FreezeRecorder, HeadRecorder

from finetune.models.backbone import backbone_blocks, create_backbone, parameter_blocks
from finetune.models.heads import create_head
from finetune.runconfig import use_scratch_when_nothing_to_protect
from finetune.schedule import Schedule
from finetune.training import run

BASE = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.05, "momentum": 0.9, "epochs": 8, "warmup_epochs": 1,
        "scheduler": "cosine", "step_size": 3, "gamma": 0.1, "backbone_lr_ratio": 0.5, "freeze_epochs": None,
        "unfreeze": None}


train = partial(support.train, recipe=[*FAST, *FIFTHS])


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_b0"])
def test_layer_decay_groups_are_timms_own(name):
    """Each backbone group holds exactly the parameters of one of timm's param_groups_layer_decay groups, with its
    weight decay and its lr scale (layer_decay ** blocks above it)."""
    from timm.optim import param_groups_layer_decay

    backbone = create_backbone(name)
    schedule = Schedule({**BASE, "phases": [{"train": "all"}], "layer_decay": 0.7}, len(backbone_blocks(backbone)))
    assert schedule.blocks == {"mobilenetv2_100": 18, "efficientnet_b0": 17}[name]
    head = create_head("linear", backbone.num_features, 3, hidden=256, dropout=0.0)
    groups = schedule.parameter_groups(backbone, head)
    ours = [g for g in groups if g["block"] is not None]
    theirs = param_groups_layer_decay(backbone, weight_decay=0.05, layer_decay=0.7)
    assert len(ours) == len(theirs)
    by_params = {frozenset(id(p) for p in g["params"]): g for g in ours}
    for group in theirs:
        mine = by_params[frozenset(id(p) for p in group["params"])]
        assert mine["weight_decay"] == group["weight_decay"]
        assert 0.7 ** (schedule.blocks - 1 - mine["block"]) == pytest.approx(group["lr_scale"])


def test_every_groups_rate_at_every_step_follows_the_formula():
    """Gradual unfreezing with layer decay: the rates the optimizer holds at each step, against the formula computed
    here on its own."""
    backbone, head = create_backbone("mobilenetv2_100"), create_head("linear", 1280, 3, hidden=256, dropout=0.0)
    phases = [{"train": "head", "epochs": 2}, {"train": 2, "epochs": 2}, {"train": "all"}]
    schedule = Schedule({**BASE, "phases": phases, "layer_decay": 0.8}, 18)
    spe, lr, ratio, decay = 3, 1e-2, 0.5, 0.8
    optimizer, scheduler = schedule.optimizer(backbone, head, spe)
    started = {None: 0, 16: 2, 17: 2}  # the epoch each group starts training; the other blocks at epoch 4

    def expected(block, step):
        epoch = step // spe
        trained = 0 if epoch < 2 else 2 if epoch < 4 else 18
        if block is not None and block < 18 - trained:
            return 0.0
        start = started.get(block, 4) * spe
        warmup = min(1.0, (step - start + 1) / spe)
        cosine = 0.5 * (1 + math.cos(math.pi * step / (8 * spe)))
        peak = lr if block is None else lr * ratio * decay ** (17 - block)
        return peak * warmup * cosine

    assert len(optimizer.param_groups) == 2 * 18 + 2  # each block and the head, with and without weight decay
    for step in range(8 * spe):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected(group["block"], step), rel=1e-9, abs=1e-15), \
                (group["name"], step)
        optimizer.step()
        scheduler.step()


def test_rates_are_put_right_when_a_run_resumes_with_another_length():
    backbone, head = create_backbone("mobilenetv2_100"), create_head("linear", 1280, 3, hidden=256, dropout=0.0)
    config = {**BASE, "freeze_epochs": 2, "unfreeze": "all", "epochs": 4}
    optimizer, scheduler = Schedule(config, 18).optimizer(backbone, head, 5)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert set(state) == {"last_epoch", "_step_count"}  # plain: the schedule's own state is in the checkpoint
    longer = Schedule({**config, "epochs": 10}, 18)
    optimizer2, scheduler2 = longer.optimizer(backbone, head, 5)
    optimizer2.load_state_dict(optimizer.state_dict())  # as Lightning restores: optimizer first, then scheduler
    scheduler2.load_state_dict(state)
    for group in optimizer2.param_groups:
        assert group["lr"] == pytest.approx(longer.rate(group["block"], 12, 5))


def test_patience_ends_a_phase_early_and_the_boundary_survives_a_checkpoint():
    schedule = Schedule({**BASE, "epochs": 10, "phases": [{"train": "head", "epochs": 6, "patience": 2},
                                                          {"train": 4, "epochs": 2}, {"train": "all"}]}, 18)
    assert [schedule.observe(e, acc) for e, acc in enumerate([0.5, 0.6, 0.6])] == [None, None, None]
    why = schedule.observe(3, 0.55)
    assert why == "val/acc has not improved for 2 epochs (best 0.6000 at epoch 1)"
    assert schedule.bounds() == [(0, 4), (4, 6), (6, 10)]
    assert schedule.phase_at(4).index == 1 and schedule.trained_blocks(4) == 4 and schedule.trained_blocks(7) == 18
    restored = Schedule(schedule.config, 18)
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))  # plain data, as in a checkpoint
    assert restored.bounds() == schedule.bounds()


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_of_the_blocks_that_train_keeps_its_statistics_unless_told_to_train(bn):
    from finetune.callbacks.schedule import apply_trainable

    backbone = create_backbone("mobilenetv2_100")
    norms = {n: m for n, m in backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.weight.detach().clone()) for n, m in norms.items()}
    apply_trainable(backbone, 4, bn)
    top = {m for names in backbone_blocks(backbone)[-4:] for m in names}
    in_top = [n for n in norms if any(n == m or n.startswith(f"{m}.") for m in top)]
    assert in_top and all(norms[n].training == (bn == "train") for n in in_top)
    assert not any(m.training for n, m in norms.items() if n not in in_top)  # frozen blocks: eval in either mode
    assert all(norms[n].weight.requires_grad for n in in_top)  # scale and shift learn in either mode
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone(torch.randn(4, 3, 64, 64) * 3 + 1).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(norms[n].running_mean, before[n][0]) == (bn == "frozen") for n in in_top)
    assert sum(not torch.equal(norms[n].weight, before[n][1]) for n in in_top) > len(in_top) // 2


def test_each_phase_says_what_it_gained_on_the_best_before_it():
    schedule = Schedule({**BASE, "epochs": 6, "phases": [{"train": "head", "epochs": 2}, {"train": 4, "epochs": 2},
                                                         {"train": "all"}]}, 18)
    for epoch, acc in enumerate([0.80, 0.90, 0.85, 0.95, 0.93, 0.94]):
        schedule.observe(epoch, acc)
    assert [(g["epochs"], g["val/acc_end"], g["val/acc_best"]) for g in schedule.gains()] == [
        ([0, 1], 0.90, 0.90), ([2, 3], 0.95, 0.95), ([4, 5], 0.94, 0.94)]
    assert [g["gain"] for g in schedule.gains()] == [None, pytest.approx(0.05), pytest.approx(-0.01)]
    lines = schedule.describe_gains()
    assert lines[1] == ("phase 2 (epochs 2-3, the head and the last 4 of 18 blocks): val/acc 0.9500 at its end, "
                        "best 0.9500; +0.0500 on the best of the phases before")
    restored = Schedule(schedule.config, 18)
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))  # checkpoints carry it
    assert restored.gains() == schedule.gains()


def test_scratch_is_the_default_only_when_nothing_was_chosen(tmp_path):
    def switched(*overrides):
        cfg = compose(tmp_path, "dataset=dogs_vs_cats", f"dataset.root={tmp_path}", *overrides)
        return use_scratch_when_nothing_to_protect(cfg, list(overrides)), cfg

    done, cfg = switched("backbone.pretrained=false")
    assert done and cfg.schedule.name == "scratch" and cfg.schedule.phases[0].backbone_lr_ratio == 1.0
    assert cfg.schedule.bn == "train"  # random running statistics are nothing to keep
    done, cfg = switched()
    assert not done and cfg.schedule.bn == "frozen"  # pretrained: the default two phases, ImageNet's statistics
    done, cfg = switched("backbone.pretrained=false", "schedule.freeze_epochs=2")
    assert not done and cfg.schedule.bn == "train"  # phases given explicitly win; BatchNorm still trains
    assert switched("backbone.pretrained=false", "schedule.bn=frozen")[1].schedule.bn == "frozen"  # unless told
    assert switched("backbone.pretrained=false", "schedule.freeze_epochs=2", "schedule.bn=frozen")[1].schedule.bn \
        == "frozen"
    assert not switched("backbone.pretrained=false", "schedule=default")[0]
    assert not switched("backbone.pretrained=false", "experiment=dogs_vs_cats_mobilenetv2")[0]  # the recipe's


def test_gradual_phases_train_exactly_their_blocks_at_decaying_rates(tmp_path, shapes):
    _, run_dir = train(tmp_path, shapes, "schedule=gradual", "schedule.epochs=3", "schedule.lr=3e-3",
                       "schedule.phases=[{train: head, epochs: 1}, {train: 2, epochs: 1}, {train: all}]",
                       RECORD_FREEZING)
    recorder = FreezeRecorder.instances[-1]
    block_of = parameter_blocks(create_backbone("mobilenetv2_100"))
    modules = backbone_blocks(create_backbone("mobilenetv2_100"))
    last_two = {m for names in modules[16:] for m in names}
    for step in recorder.steps:
        epoch = step["epoch"]
        if epoch == 0:  # the head alone: no gradient, every BatchNorm fixed, no rate
            assert step["with_grad"] == [] and step["modules_training"] == []
            assert torch.equal(step["bn_running_mean"], recorder.initial["bn1.running_mean"])
            assert all(lr == 0 for name, lr in step["lr"].items() if name.startswith("backbone"))
        elif epoch == 1:  # the last two blocks, and only their modules in train mode
            assert step["with_grad"] and {block_of[n] for n in step["with_grad"]} == {16, 17}
            assert {m for m in step["modules_training"] if m in last_two} == last_two
            assert not any(m in step["modules_training"] for names in modules[:16] for m in names)
            assert torch.equal(step["bn_running_mean"], recorder.initial["bn1.running_mean"])  # the stem's
            assert step["lr"]["backbone.17"] > step["lr"]["backbone.16"] > 0 == step["lr"]["backbone.15"]
            assert step["lr"]["backbone.16"] == pytest.approx(0.85 * step["lr"]["backbone.17"])
        else:  # everything
            assert {block_of[n] for n in step["with_grad"]} == set(range(18)) and "" in step["modules_training"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(state["backbone.conv_stem.weight"], recorder.initial["conv_stem.weight"])
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    assert {f"lr/backbone.{b}" for b in range(18)} | {"lr/head", "lr/head.no_decay"} <= set(rows[0])


def test_a_phase_that_stops_improving_ends_early_and_a_resume_stays_in_the_next_phase(tmp_path, shapes, caplog):
    # the probe's rate underflows to no update at all: val/acc cannot improve after its first epoch
    phases = "schedule.phases=[{train: head, epochs: 4, lr: 1e-50, patience: 1}, {train: all, lr: 3e-3}]"
    with caplog.at_level("INFO", logger="finetune"):
        metrics, run_dir = train(tmp_path, shapes, phases, "schedule.freeze_epochs=null", "schedule.unfreeze=null",
                                 "schedule.epochs=3", "logger=csv", RECORD_FREEZING)
    assert "Phase 1 ends after epoch 1: val/acc has not improved for 1 epochs (best" in caplog.text
    assert "phase 2 starts at epoch 2" in caplog.text
    steps = FreezeRecorder.instances[-1].steps
    assert all(s["with_grad"] == [] for s in steps if s["epoch"] < 2)
    assert all(len(s["with_grad"]) > 100 for s in steps if s["epoch"] == 2) and metrics["epochs"] == 3
    # resumed for longer, it goes on in phase 2, which started early: the boundary is in the checkpoint (without
    # it, epoch 3 would still be in the probe's planned four epochs)
    resumed = run(compose(tmp_path / "ignored", f"resume={run_dir}"), overrides=["schedule.epochs=5", RECORD_FREEZING])
    steps = FreezeRecorder.instances[-1].steps
    assert sorted({s["epoch"] for s in steps}) == [3, 4]
    assert all(len(s["with_grad"]) > 100 and s["lr"]["backbone"] > 0 for s in steps)
    assert resumed["epochs"] == 5


def test_restore_best_starts_the_next_phase_from_the_best_weights_so_far(tmp_path, shapes, caplog):
    phases = "schedule.phases=[{train: all, epochs: 2, lr: 1e-2}, {train: head}]"
    with caplog.at_level("INFO", logger="finetune"):
        train(tmp_path, shapes, phases, "schedule.freeze_epochs=null", "schedule.unfreeze=null", "logger=none",
              "schedule.restore_best=true", "schedule.epochs=3",
              "callbacks.extra=[{_target_: support.recorders.HeadRecorder}]")
    heads = HeadRecorder.instances[-1]
    best = max((0, 1), key=lambda e: (heads.val_acc[e], -e))  # the first best: a tie does not replace best.ckpt
    assert best == 0 and not torch.equal(heads.validated[1], heads.validated[0])  # so restoring changes weights
    assert torch.equal(heads.epoch_start[2], heads.validated[best])
    assert "Phase 2 starts from the best weights so far" in caplog.text


def test_ema_weights_are_validated_checkpointed_and_evaluated(tmp_path, shapes):
    decay = 0.8
    metrics, run_dir = train(tmp_path, shapes, "schedule.ema=0.8", "schedule.epochs=3", "schedule.freeze_epochs=1",
                             "schedule.lr=3e-3", "callbacks.extra=[{_target_: support.recorders.HeadRecorder}]")
    average = None
    for weights in HeadRecorder.instances[-1].after_step:  # the average, computed here on its own
        average = weights if average is None else decay * average + (1 - decay) * weights
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.allclose(last["state_dict"]["head.1.weight"], average, atol=1e-6)
    assert not torch.allclose(last["current_model_state"]["head.1.weight"], average, atol=1e-4)  # live weights beside
    from test_tools import tool_cfg

    from finetune.evaluate import run as evaluate

    evaluated = evaluate(tool_cfg("evaluate", ckpt=run_dir / "checkpoints" / "best.ckpt", out=tmp_path / "eval",
                                  num_workers=0))
    assert evaluated["images"] == metrics["test_images"]
    assert_agree(evaluated["accuracy"], metrics["test/acc"], images=metrics["test_images"])  # the average's


LP_FT_MARGIN = 10  # test images above chance (8 of 24). Measured over 4 arithmetics x 3 seeds
# (benchmarks/arithmetics.py): +13 to +15, median +14


@pytest.mark.learning
def test_lp_ft_probes_on_cached_features_then_fine_tunes_everything_from_the_best_probe(tmp_path, shapes, caplog):
    with caplog.at_level("INFO", logger="finetune"):
        metrics, _ = train(tmp_path, shapes, "schedule=lp_ft", "augment=none",
                           "callbacks.extra=[{_target_: support.recorders.BatchKinds}]")
    kinds = BatchKinds.instances[-1]
    probe = {e for e, d in kinds.train if d == 2}
    tuned = {e for e, d in kinds.train if d == 4}
    assert probe and tuned and max(probe) < min(tuned)  # features while the backbone is frozen, then images
    assert len(tuned) == 10 and metrics["epochs"] == max(tuned) + 1  # the fine-tuning phase is its 10 epochs
    assert {e: d for e, d in kinds.val} == {e: 2 if e in probe else 4 for e in probe | tuned}
    if len(probe) < 20:
        assert "Phase 1 ends after epoch" in caplog.text and "Phase 2 starts from the best weights" in caplog.text
    assert_above_chance(metrics, margin=LP_FT_MARGIN, classes=3)  # chance: 8 of 24


def test_gradual_from_the_command_line(tmp_path, shapes):
    result = run_script("train", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "schedule=gradual",
                        "schedule.epochs=9", "schedule.layer_decay=0.7", "logger=csv", "dataset.limit_per_class=16",
                        "calibrate=false", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Epoch 2: phase 2 of 5 (epochs 2-3): the head and the last 2 of 18 blocks train" in output
    assert "Epoch 8: phase 5 of 5 (epochs 8-8): the head and all 18 blocks of the backbone train" in output
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    assert "name: gradual" in (run_dir / "config.yaml").read_text()
    rows = [r for r in csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")) if r["lr/backbone.17"]]
    last = rows[-1]
    assert float(last["lr/backbone.16"]) == pytest.approx(0.7 * float(last["lr/backbone.17"]))


# test images above chance (12 of 24). Measured under 4 arithmetics (benchmarks/arithmetics.py; the command fixes
# the seed): +6 to +9
SCRATCH_MARGIN = 4


@pytest.mark.slow
@pytest.mark.learning
def test_a_random_backbone_gets_the_scratch_schedule_and_learns(tmp_path):
    """The issue's command on a Kaggle-layout set, without pretrained weights: everything trains from the first
    epoch, and it learns in 8 epochs."""
    from support.fabricate import make_dogs_vs_cats

    root = make_dogs_vs_cats(tmp_path / "dogs-vs-cats", per_class=120)
    result = run_script("train", "dataset=dogs_vs_cats", f"dataset.root={root}", "backbone.pretrained=false",
                        "dataset.image_size=32", "schedule.epochs=8", "dataset.batch_size=16", "dataset.num_workers=0",
                        "trainer.accelerator=cpu", "callbacks.progress_bar=false", "logger=none",
                        "callbacks.extra=[{_target_: support.recorders.RankWeights}]", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "this run uses schedule=scratch" in output
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    parameters = len(list(create_backbone("mobilenetv2_100").parameters()))
    assert all(epoch["trainable"] == parameters for epoch in json.loads((run_dir / "rank0.json").read_text()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_above_chance(metrics, margin=SCRATCH_MARGIN, classes=2)


# The previous release's cases: its default (AdamW, cosine, the whole backbone after one frozen epoch) and SGD with
# step decay unfreezing the last 4 blocks. With weight decay on biases and norms switched back on, the shorthand must
# train exactly what that release's own code (support.reference, run beside it) trains.
PREVIOUS_RELEASE = {
    "adamw": [],
    "sgd_step_last4": ["schedule.unfreeze=4", "schedule.optimizer=sgd", "schedule.scheduler=step",
                       "schedule.step_size=1", "schedule.gamma=0.5", "schedule.lr=1e-2"],
}


@pytest.mark.parametrize("case", list(PREVIOUS_RELEASE))
def test_the_two_phase_shorthand_reproduces_the_previous_release(tmp_path, shapes, case):
    """Both recipes run here, one after the other, on this machine's arithmetic: the same metrics and the same
    weights, bit for bit. (A checksum recorded on one machine is not a reference: another CPU's kernels moved it by
    2e-6 to 5e-6 relative.)"""
    common = ["schedule.lr=3e-3", "schedule.backbone_lr_ratio=0.03", "schedule.epochs=3", "schedule.freeze_epochs=1",
              "trainer.deterministic=true", "logger=none", "seed=7", "schedule.norm_bias_decay=true",
              "dataset.limit_per_class=20", "calibrate=false", *PREVIOUS_RELEASE[case]]
    shorthand, _ = train(tmp_path, shapes, *common, name="shorthand")
    reference, _ = train(tmp_path, shapes, *common, "callbacks.extra=[{_target_: support.reference.PreviousRelease}]",
                         name="reference")
    for key in ("test/acc", "test/loss", "val/acc_best", "global_step"):
        assert shorthand[key] == reference[key], key
    ours, theirs = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
                    for name in ("shorthand", "reference"))
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k]) for k in ours["state_dict"])
    # two different pieces of code trained them: the reference's two groups and LambdaLR, the schedule's own
    assert [g["name"] for g in theirs["optimizer_states"][0]["param_groups"]] == ["backbone", "head"]
    assert "lr_lambdas" in theirs["lr_schedulers"][0] and "lr_lambdas" not in ours["lr_schedulers"][0]


def test_unknown_phase_keys_and_contradictions_are_one_line(tmp_path):
    from finetune.checks import validate
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"schedule.freeze_epochs=2 and schedule.phases are both set"):
        validate(compose(tmp_path, "schedule.phases=[{train: all}]"))
    with pytest.raises(ConfigError, match=r"schedule.phases\[0\].epochs is null .* only the last phase"):
        validate(compose(tmp_path, "schedule=gradual", "schedule.phases=[{train: head}, {train: all}]"))
    with pytest.raises(ConfigError, match=r"schedule.phases\[1\].train must be head, all or a number of blocks"):
        validate(compose(tmp_path, "schedule=gradual", "schedule.phases=[{train: head, epochs: 1}, {train: some}]"))
    with pytest.raises(ConfigError, match=r"schedule.layer_decay must be in \(0, 1\]"):
        validate(compose(tmp_path, "schedule.layer_decay=1.5"))
    with pytest.raises(ConfigError, match=r"schedule.lr must be a finite number \(got inf\)"):
        validate(compose(tmp_path, "schedule.lr=inf"))
    with pytest.raises(Exception, match="epoch"):  # a mistyped phase key is named by the schema
        compose(tmp_path, "schedule=gradual", "schedule.phases=[{train: head, epoch: 1}, {train: all}]")
    with pytest.raises(ConfigError, match="this backbone has 18 blocks"):
        Schedule({**BASE, "phases": [{"train": 30}]}, 18)


@pytest.mark.slow
def test_ddp_ranks_stay_identical_across_every_phase_boundary_with_gradual_and_layer_decay(tmp_path, shapes):
    result = run_process("train", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "trainer=ddp",
                         "trainer.accelerator=cpu", "trainer.devices=2", "schedule=gradual", "schedule.layer_decay=0.8",
                         "schedule.epochs=4", "schedule.phases=[{train: head, epochs: 1}, {train: 2, epochs: 1}, "
                         "{train: 6, epochs: 1}, {train: all}]", "schedule.lr=3e-3",
                         "callbacks.extra=[{_target_: support.recorders.RankWeights}]", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["epoch"] for e in ranks[0]] == [0, 1, 2, 3]
    trainable = [e["trainable"] for e in ranks[0]]
    assert trainable[0] == 0 < trainable[1] < trainable[2] < trainable[3]  # one more group of blocks per phase
    for a, b in zip(*ranks):
        assert a["sum"] == b["sum"] and a["first"] == b["first"], (a, b)
    assert ranks[0][3]["sum"] != ranks[0][0]["sum"]


def test_a_run_resumed_in_the_middle_of_an_epoch_trains_what_that_epoch_trains(tmp_path, shapes):
    """Lightning does not start an epoch again when it resumes in its middle (no on_train_epoch_start)."""
    from finetune.errors import Preempted

    with pytest.raises(Preempted):  # pre-empted at step 6: in epoch 1, after the frozen epoch 0 (4 steps)
        train(tmp_path, shapes, "schedule.epochs=2", "schedule.freeze_epochs=1", "logger=none",
              "callbacks.extra=[{_target_: support.recorders.SigtermAt, step: 6}]")
    run(compose(tmp_path / "ignored", f"resume={tmp_path / 'run'}"), overrides=[RECORD_FREEZING])
    steps = FreezeRecorder.instances[-1].steps
    assert steps and {s["epoch"] for s in steps} == {1}
    assert all(len(s["with_grad"]) > 100 and s["lr"]["backbone"] > 0 for s in steps)


def test_sigterm_while_validating_saves_the_epoch_and_resume_finishes_its_validation(tmp_path, shapes):
    """Issue 22 item 14: SIGTERM during the validation inside fitting saved nothing (the epoch's steps were lost)."""
    from support.recorders import SigtermInValidation

    from finetune.errors import Preempted

    SigtermInValidation.fired = False
    with pytest.raises(Preempted):
        train(tmp_path, shapes, "schedule.epochs=3", "schedule.freeze_epochs=1", "logger=csv",
              "callbacks.extra=[{_target_: support.recorders.SigtermInValidation, epoch: 1}]")
    run_dir = tmp_path / "run"
    stopped = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["global_step"] > 0
    metrics = run(compose(tmp_path / "ignored", f"resume={run_dir}"),
                  overrides=["callbacks.extra=[{_target_: support.recorders.BatchKinds}]"])
    assert metrics["epochs"] == 3 and metrics["global_step"] * 2 == stopped["global_step"] * 3  # no epoch trained twice
    rows = [r for path in run_dir.rglob("metrics.csv") for r in csv.DictReader(open(path))]
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/acc")) == [0, 1, 2]  # each epoch validated once
    validated = [epoch for epoch, _ in BatchKinds.instances[-1].val]
    assert validated.count(1) == validated.count(2) > 1  # epoch 1's validation run again whole, from its first batch


def test_resumed_after_the_frozen_epochs_cached_features_give_way_to_images(tmp_path, shapes):
    """The first training loader can be made before a resumed run's epoch is restored (to count the schedule's
    steps): it must be made again for the epoch the run is at, images once the backbone trains."""
    _, run_dir = train(tmp_path, shapes, "schedule.cache_features=true", "schedule.freeze_epochs=1",
                       "schedule.epochs=2", "logger=none")
    run(compose(tmp_path / "ignored", f"resume={run_dir}"),
        overrides=["schedule.epochs=3", "callbacks.extra=[{_target_: support.recorders.BatchKinds}]"])
    kinds = BatchKinds.instances[-1]
    assert kinds.train and all(e == 2 and d == 4 for e, d in kinds.train + kinds.val)


def test_validation_every_other_epoch_still_moves_from_features_to_images(tmp_path, shapes):
    train(tmp_path, shapes, "schedule.cache_features=true", "schedule.freeze_epochs=2", "schedule.epochs=4",
          "+trainer.check_val_every_n_epoch=2", "logger=none",
          "callbacks.extra=[{_target_: support.recorders.BatchKinds}]")
    kinds = BatchKinds.instances[-1]
    assert {e: d for e, d in kinds.val} == {1: 2, 3: 4}  # epoch 3 validates images: the backbone trained in epoch 2
    assert {e: d for e, d in kinds.train} == {0: 2, 1: 2, 2: 4, 3: 4}


def test_a_run_of_the_previous_release_resumes_with_its_own_parameter_groups(tmp_path, shapes):
    """Its config has no schedule.norm_bias_decay and its optimizer two groups: it resumes with weight decay on
    everything, as it was trained; nor schedule.bn: its BatchNorm goes on training. And an EMA cannot be switched on
    or off by a resume."""
    from omegaconf import OmegaConf

    from finetune.errors import ConfigError

    _, run_dir = train(tmp_path, shapes, "schedule.norm_bias_decay=true", "schedule.epochs=1", "logger=none",
                       "schedule.bn=frozen")
    saved = OmegaConf.load(run_dir / "config.yaml")
    del saved.schedule["norm_bias_decay"]
    del saved.schedule["bn"]
    OmegaConf.save(saved, run_dir / "config.yaml")
    with pytest.raises(ConfigError, match="schedule.ema cannot change when a run resumes"):
        run(compose(tmp_path / "ignored", f"resume={run_dir}"), overrides=["schedule.ema=0.9"])
    metrics = run(compose(tmp_path / "ignored", f"resume={run_dir}"), overrides=["schedule.epochs=2"])
    assert metrics["epochs"] == 2
    assert OmegaConf.load(run_dir / "config.yaml").schedule.bn == "train"
