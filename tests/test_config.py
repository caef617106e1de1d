"""Composition of every preset, and the one-line errors for bad config values, before any work starts."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from support import CONF, compose

from finetune.checks import validate
from finetune.errors import ConfigError


def test_default_run_is_digits_from_scratch(tmp_path):
    from finetune.runconfig import use_scratch_when_nothing_to_protect

    cfg = compose(tmp_path)
    assert use_scratch_when_nothing_to_protect(cfg, [])
    cfg = validate(cfg)
    assert cfg.dataset.name == "digits"
    assert cfg.backbone.name == "mobilenetv2_100"
    assert cfg.backbone.pretrained is False  # nothing can be downloaded offline
    assert cfg.schedule.name == "scratch" and cfg.schedule.phases[0].train == "all"
    assert cfg.augment.hflip == 0.0  # digits must not be mirrored
    assert cfg.run_dir == str(tmp_path)


def test_photo_datasets_default_to_imagenet_weights_and_a_frozen_phase(tmp_path):
    cfg = validate(compose(tmp_path, "dataset=dogs_vs_cats", f"dataset.root={tmp_path}"))
    assert cfg.backbone.pretrained is True
    assert cfg.schedule.freeze_epochs == 2
    assert cfg.augment.name == "light" and cfg.augment.hflip == 0.5
    assert cfg.dataset.image_size is None  # the backbone's own input size


def test_command_line_values_beat_the_dataset_preset(tmp_path):
    cfg = validate(compose(tmp_path, "schedule.freeze_epochs=3", "augment.hflip=0.3", "backbone=efficientnet_b0"))
    assert cfg.schedule.freeze_epochs == 3 and cfg.augment.hflip == 0.3
    assert cfg.backbone.name == "efficientnet_b0" and cfg.backbone.pretrained is False


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["dataset", "backbone", "head", "schedule", "augment", "trainer", "logger",
                                   "callbacks", "debug", "experiment"])
def test_every_preset_composes_and_validates(tmp_path, group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="no CUDA GPU"):  # composes, and says why it cannot run here
                validate(compose(tmp_path, f"{group}={option}", f"dataset.root={tmp_path}"))
            continue
        extra = []
        if (group, option) == ("dataset", "table"):  # its table is the user's: one that exists
            (tmp_path / "labels.csv").write_text("path,label\n")
            extra = ["dataset.table=labels.csv"]
        if (group, option) == ("dataset", "hf"):
            extra = [f"dataset.path={tmp_path}"]
        cfg = validate(compose(tmp_path, f"{group}={option}", f"dataset.root={tmp_path}", *extra))
        assert group in ("debug", "experiment") or cfg[group] is not None


@pytest.mark.parametrize(("experiment", "expected"), [
    ("dogs_vs_cats_mobilenetv2", {"dataset.name": "dogs_vs_cats", "head.name": "mlp", "head.binary": True,
                                  "schedule.optimizer": "adam", "backbone.pretrained": True}),
    ("dogs_vs_cats_efficientnet_b0", {"backbone.name": "efficientnet_b0", "dataset.balance": "weights",
                                      "augment.name": "classic", "head.binary": True}),
    ("cifar10_mobilenetv2", {"dataset.name": "cifar10", "dataset.image_size": None, "schedule.freeze_epochs": 1}),
    ("dog_breeds_mobilenetv2", {"dataset.name": "dog_breeds", "schedule.unfreeze": 4}),
    ("alpaca_mobilenetv2", {"dataset.name": "image_folder", "dataset.image_size": 160, "schedule.unfreeze": 6,
                            "augment.name": "classic", "head.binary": True}),
])
def test_recipes_set_what_their_seed_projects_did(tmp_path, experiment, expected):
    from omegaconf import OmegaConf

    cfg = validate(compose(tmp_path, f"experiment={experiment}", f"dataset.root={tmp_path}"))
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_every_augment_preset_makes_uint8_images_at_the_input_size(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.data.transforms import Preprocessing, train_transform

    pre = Preprocessing(32, 0.875, "bicubic", (0.5,) * 3, (0.25,) * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    for option in _options("augment"):
        out = train_transform(pre, compose(tmp_path, f"augment={option}").augment)(image)
        assert out.shape == (3, 32, 32) and out.dtype.is_floating_point is False, option


@pytest.mark.parametrize(("override", "message"), [
    ("schedule.lr=0", "schedule.lr must be > 0 (got 0.0)"),
    ("schedule.lr=-0.1", "schedule.lr must be > 0"),
    ("dataset.batch_size=0", "dataset.batch_size must be > 0"),
    ("dataset.batch_size=-8", "dataset.batch_size must be > 0"),
    ("schedule.optimizer=adamx", "schedule.optimizer must be one of adamw, adam, sgd"),
    ("schedule.scheduler=linear", "schedule.scheduler must be one of cosine, step, constant"),
    ("schedule.bn=fixed", "schedule.bn must be one of frozen, train (got fixed)"),
    ("schedule.unfreeze=some", "schedule.unfreeze must be 'all' or a number of blocks"),
    ("schedule.unfreeze=0", "schedule.unfreeze must be 'all' or a number of blocks >= 1"),
    ("schedule.epochs=0", "schedule.epochs must be >= 1"),
    ("head.name=conv", "head.name must be one of linear, mlp"),
    ("head.dropout=1.5", "head.dropout must be in [0, 1)"),
    ("dataset.test_fraction=0.9", "dataset.val_fraction + dataset.test_fraction must be < 1"),
    ("augment.crop=random", "augment.crop must be one of random_resized, center"),
    ("backbone.name=mobilenet_v2", "backbone.name=mobilenet_v2 is not a timm model. Closest timm names:"),
    ("backbone.weights=/no/such/file.pth", "backbone.weights=/no/such/file.pth: no such file"),
    ("+trainer.max_epoch=3", "trainer.max_epoch is not an argument of lightning.Trainer. Did you mean max_epochs"),
    ("+trainer.max_epochs=3", "set the number of epochs with schedule.epochs"),
])
def test_bad_values_fail_with_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose(tmp_path, override))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_backbone_suggests_the_closest_timm_names(tmp_path):
    with pytest.raises(ConfigError, match="mobilenetv2_100"):
        validate(compose(tmp_path, "backbone.name=mobilenetv2_10"))


def test_pretrained_weights_must_exist_in_timm(tmp_path):
    # timm knows this architecture but publishes no weights for it
    with pytest.raises(ConfigError, match="no pretrained weights for mobilenetv2_035"):
        validate(compose(tmp_path, "backbone.name=mobilenetv2_035", "backbone.pretrained=true"))


def test_dataset_root_is_required_where_the_data_is_not_bundled(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.root is required for dataset=dogs_vs_cats: dataset.root="):
        validate(compose(tmp_path, "dataset=dogs_vs_cats"))


def test_unknown_key_fails_at_composition_naming_it_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        compose(tmp_path, "schedule.lrr=1e-3")
    assert "schedule.lrr" in str(error.value) and "schedule.lr" in str(error.value) and "\n" not in str(error.value)


def test_wrong_type_fails_at_composition_naming_the_key_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        compose(tmp_path, "schedule.lr=fast")
    assert "schedule.lr" in str(error.value) and "\n" not in str(error.value)


def test_typo_in_a_users_own_preset_is_caught(tmp_path):
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "mine.yaml").write_text("name: image_folder\nroot: /data\nbatchsize: 32\n")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as error:
            hydra_compose("train", overrides=[f"hydra.searchpath=[file://{conf}]", "dataset=mine"])
    assert "batchsize" in str(error.value.__cause__ or error.value)


def test_resume_needs_a_last_checkpoint(tmp_path):
    from finetune.training import run

    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ConfigError, match="no .*last.ckpt to resume from"):
        run(compose(tmp_path / "new", f"resume={tmp_path / 'empty-run'}"), overrides=[])
    with pytest.raises(ConfigError, match="no such run directory"):
        run(compose(tmp_path / "new", f"resume={tmp_path / 'missing'}"), overrides=[])
    assert not (tmp_path / "new").exists()


def test_hydra_run_dirs_are_unique_and_resumes_log_inside_the_run(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        fresh = hydra_compose("train", return_hydra_config=True)
        resumed = hydra_compose("train", overrides=["resume=outputs/runs/x"], return_hydra_config=True)
    run_dir = fresh.hydra.run.dir
    assert run_dir.startswith("outputs/runs/") and len(Path(run_dir).name) == len("2026-11-21_05-17-04-415393")
    assert resumed.hydra.run.dir.startswith("outputs/runs/x/resumed/")
