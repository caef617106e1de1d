"""Backbone, heads, the ImageModule's normalisation and parameter groups, and the learning-rate schedule."""

import math
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.errors import ConfigError, WeightsUnavailable
from finetune.models.backbone import backbone_blocks, create_backbone
from finetune.models.module import ImageModule
from finetune.schedule import Schedule

SCHEDULE = {"epochs": 10, "warmup_epochs": 1, "scheduler": "cosine", "step_size": 3, "gamma": 0.1, "lr": 1.0,
            "backbone_lr_ratio": 1.0, "freeze_epochs": 2, "unfreeze": "all"}


def test_backbone_lr_is_zero_while_frozen_then_warms_up():
    spe, schedule = 5, Schedule(SCHEDULE, blocks=18)
    assert all(schedule.rate(17, s, spe) == 0.0 for s in range(2 * spe))
    ramp = [schedule.rate(17, s, spe) for s in range(2 * spe, 3 * spe + 1)]
    assert all(b > a for a, b in zip(ramp[:spe], ramp[1:spe]))  # linear warm-up from the unfreeze
    assert ramp[0] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 10 / 50)))
    head = [schedule.rate(None, s, spe) for s in range(50)]
    assert head[0] > 0 and head[4] == pytest.approx(max(head), rel=0.01)
    assert head[-1] < 0.01  # cosine to zero at the end


def test_step_and_constant_schedules():
    step = Schedule({**SCHEDULE, "scheduler": "step", "warmup_epochs": 0}, blocks=18)
    assert step.rate(None, 0, 10) == 1.0 and step.rate(None, 30, 10) == pytest.approx(0.1)
    const = Schedule({**SCHEDULE, "scheduler": "constant", "warmup_epochs": 0}, blocks=18)
    assert const.rate(None, 0, 10) == const.rate(None, 99, 10) == 1.0


def test_mobilenetv2_has_18_blocks_in_timms_grouping():
    blocks = backbone_blocks(create_backbone("mobilenetv2_100"))
    assert len(blocks) == 18
    assert blocks[0] == ["conv_stem", "bn1"]
    assert "conv_head" in blocks[-1] and "blocks.6.0.conv_pw" in blocks[-1]


def test_weights_file_loads_with_or_without_a_classifier(tmp_path):
    source = timm.create_model("mobilenetv2_100", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    save_file({k: v for k, v in source.state_dict().items() if not k.startswith("classifier")},
              tmp_path / "features.safetensors")
    for name in ("imagenet.pth", "features.safetensors"):
        backbone = create_backbone("mobilenetv2_100", weights=str(tmp_path / name)).eval()
        assert torch.equal(backbone.conv_stem.weight, source.conv_stem.weight)
        assert torch.equal(backbone.bn2.running_var, source.bn2.running_var)
        assert backbone.num_features == 1280 and backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 1280)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="does not load into backbone.name=mobilenetv2_100: these are the weights of "
                                          "another architecture"):
        create_backbone("mobilenetv2_100", weights=str(tmp_path / "resnet.pth"))
    # names that match nothing: timm loads a file without its classifier non-strictly, so this loaded nothing, silently
    torch.save({"encoder.layer0.weight": torch.randn(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"\(52 of the backbone's 52 weight tensors are not in the file \(e.g. "
                                          r"conv_stem.weight\)\)"):
        create_backbone("mobilenetv2_100", weights=str(tmp_path / "other.pth"))


def test_unavailable_pretrained_weights_name_the_three_ways_on():
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable, as on a machine without network
    with pytest.raises(WeightsUnavailable) as error:
        create_backbone("efficientnet_b0", pretrained=True)
    message = str(error.value)
    assert "connect to the internet once" in message
    assert "backbone.weights=/path/to/file" in message
    assert "backbone.pretrained=false" in message


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_offline_without_cached_weights_fails_at_once_without_trying_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _no_network(monkeypatch)  # HF_HUB_OFFLINE=1 (conftest): not even one connection attempt
    tried = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: tried.append(k) or pytest.fail("timm was asked"))
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        create_backbone("mobilenetv2_100", pretrained=True)
    assert tried == []


def test_an_unreachable_hub_is_one_short_try_then_the_message(monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    attempts = []

    def unreachable(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was asked to download"))
    with pytest.raises(WeightsUnavailable, match="huggingface.co is unreachable: Network is unreachable"):
        create_backbone("mobilenetv2_100", pretrained=True)
    assert attempts == [(("huggingface.co", 443), 5.0)]


def _hub_cache(hf_home, repo, state_dict, revision="0123abcd"):
    """The Hugging Face hub cache as a download leaves it: blobs, a snapshot and refs/main."""
    from safetensors.torch import save_file

    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "snapshots" / revision / "model.safetensors")


@pytest.mark.parametrize("cache", ["huggingface", "torch hub"])
def test_weights_in_a_local_cache_load_offline_without_the_network(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    trained = timm.create_model("mobilenetv2_100")  # stands for the published weights, classifier included
    if cache == "huggingface":
        _hub_cache(tmp_path / "hf", "timm/mobilenetv2_100.ra_in1k", trained.state_dict())
    else:
        (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(trained.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "mobilenetv2_100_ra-b33bc2c4.pth")
    _no_network(monkeypatch)
    backbone = create_backbone("mobilenetv2_100", pretrained=True)
    loaded = backbone.state_dict()
    assert loaded.keys() and all(torch.equal(loaded[k], trained.state_dict()[k]) for k in loaded)


def _classifier(head="linear", k=3):
    pre = {"image_size": 32, "crop_pct": 1.0, "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6], "std": [0.2] * 3}
    schedule = {**SCHEDULE, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "momentum": 0.9,
                "freeze_epochs": 1, "unfreeze": "all", "backbone_lr_ratio": 0.1}
    return ImageModule(create_backbone("mobilenetv2_100"), [str(i) for i in range(k)],
                      {"name": "mobilenetv2_100"}, {"name": head, "hidden": 16, "dropout": 0.1}, schedule, pre)


def test_forward_normalises_uint8_images_like_torchvision_would():
    model = _classifier().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.2
    with torch.no_grad():
        assert torch.allclose(model(images), model.head(model.backbone(expected)), atol=1e-5)


def test_heads_start_at_zero_logits_and_have_the_keras_shapes():
    assert [type(m).__name__ for m in _classifier("linear").head] == ["Dropout", "Linear"]
    mlp = _classifier("mlp").head
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert mlp[0].out_features == 16
    with torch.no_grad():
        assert torch.count_nonzero(mlp(torch.randn(4, 1280))) == 0


def test_optimizer_has_named_backbone_and_head_groups_with_their_rates():
    model = _classifier()
    model._steps_per_epoch = lambda: 10  # what the Trainer would estimate from the train loader
    config = model.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert list(groups) == ["backbone", "backbone.no_decay", "head", "head.no_decay"]
    ids = lambda *names: {id(p) for n in names for p in groups[n]["params"]}  # noqa: E731
    assert ids("backbone", "backbone.no_decay") == {id(p) for p in model.backbone.parameters()}
    assert ids("head", "head.no_decay") == {id(p) for p in model.head.parameters()}
    # no weight decay on biases and normalisation parameters (timm's and torchvision's convention)
    assert all(p.ndim <= 1 for n in ("backbone.no_decay", "head.no_decay") for p in groups[n]["params"])
    assert all(p.ndim > 1 for n in ("backbone", "head") for p in groups[n]["params"])
    assert groups["backbone.no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.01
    assert groups["backbone"]["lr"] == groups["backbone.no_decay"]["lr"] == 0.0  # frozen at step 0
    head_rate = model.schedule.rate(None, 0, 10)
    assert groups["head"]["lr"] == groups["head.no_decay"]["lr"] == pytest.approx(head_rate) and head_rate > 0
    assert config["lr_scheduler"]["interval"] == "step" and config["lr_scheduler"]["name"] == "lr"


def test_binary_head_is_one_logit_trained_with_binary_cross_entropy():
    import torch.nn.functional as F

    model = _classifier(k=2)
    binary = ImageModule(create_backbone("mobilenetv2_100"), ["cat", "dog"], {"name": "mobilenetv2_100"},
                        {"name": "mlp", "hidden": 8, "dropout": 0.0, "binary": True}, model.hparams.schedule,
                        model.hparams.preprocessing).eval()
    assert binary.head[-1].out_features == 1
    torch.nn.init.normal_(binary.head[-1].weight)
    with torch.no_grad():
        logits = binary(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (4, 2) and torch.all(logits[:, 0] == 0)
    labels = torch.tensor([0, 1, 1, 0])
    bce = F.binary_cross_entropy_with_logits(logits[:, 1], labels.float())
    assert torch.allclose(binary.criterion(logits, labels), bce, atol=1e-6)
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(logits[:, 1]))


def test_binary_head_needs_two_classes():
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="head.binary=true needs two classes; this dataset has 3"):
        ImageModule(create_backbone("mobilenetv2_100"), ["a", "b", "c"], {"name": "mobilenetv2_100"},
                   {"name": "linear", "hidden": 8, "dropout": 0.0, "binary": True}, {},
                   _classifier().hparams.preprocessing)


def test_mixup_and_cutmix_train_on_soft_targets():
    model = _classifier()
    mixed = ImageModule(model.backbone, model.classes, {"name": "mobilenetv2_100"},
                       {"name": "linear", "hidden": 8, "dropout": 0.0}, model.hparams.schedule,
                       model.hparams.preprocessing, mix={"mixup": 0.4, "cutmix": 1.0})
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x, soft = mixed.mix(mixed.normalize(images), labels)
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6))
    assert not torch.equal(x, mixed.normalize(images))
    loss = mixed.training_step((images, labels), 0)
    assert torch.isfinite(loss)


def test_every_kind_of_timm_name_is_checked_before_any_work(tmp_path):
    from omegaconf import OmegaConf

    from finetune.models.backbone import check as check_backbone

    def check(name):
        check_backbone(OmegaConf.create({"name": name, "pretrained": True, "weights": None}))

    for name in ("mobilenetv2_100", "mobilenetv2_100.ra_in1k", "efficientnet_b0.ra4_e3600_r224_in1k",
                 "convnext_tiny.fb_in22k_ft_in1k", "vit_small_patch14_dinov2.lvd142m",
                 "hf-hub:timm/eva02_small_patch14_336.mim_in22k_ft_in1k"):
        check(name)
    with pytest.raises(ConfigError, match=r"efficientnet_b0 has no pretrained tag 'ra4'; its tags: .*ra_in1k.*"
                                          r"ra4_e3600_r224_in1k"):
        check("efficientnet_b0.ra4")
    with pytest.raises(ConfigError, match="mobilnetv2_100 is not a timm model. Closest timm names: mobilenetv2_100"):
        check("mobilnetv2_100.ra_in1k")
    with pytest.raises(ConfigError, match="a Hub model is named hf-hub:ORG/NAME"):
        check("hf-hub:eva02")
    with pytest.raises(ConfigError, match="expected a folder holding config.json"):
        check(f"local-dir:{tmp_path}")


def test_the_preprocessing_is_the_tags_own():
    from finetune.data.transforms import resolve_preprocessing

    ra4 = resolve_preprocessing(create_backbone("efficientnet_b0.ra4_e3600_r224_in1k"), None, None)
    ra = resolve_preprocessing(create_backbone("efficientnet_b0.ra_in1k"), None, None)
    assert (ra4.crop_pct, ra4.mean) == (0.9, (0.5, 0.5, 0.5))
    assert (ra.crop_pct, ra.mean) == (0.875, (0.485, 0.456, 0.406))


def test_a_hub_model_in_the_local_cache_loads_offline_and_rebuilds_from_the_checkpoint_alone(monkeypatch, tmp_path):
    import json

    from finetune.models.backbone import architecture, rebuild_backbone

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(5)
    published = timm.create_model("mobilenetv2_100.ra_in1k")
    _hub_cache(tmp_path / "hf", "someone/pet-mobilenet", published.state_dict())
    snapshot = next((tmp_path / "hf" / "hub").glob("models--someone--pet-mobilenet/snapshots/*"))
    timm.models.save_for_hf(published, snapshot / "unused")  # timm's own config.json for it
    (snapshot / "config.json").write_text((snapshot / "unused" / "config.json").read_text())
    assert json.loads((snapshot / "config.json").read_text())["architecture"] == "mobilenetv2_100"
    _no_network(monkeypatch)
    name = "hf-hub:someone/pet-mobilenet"
    backbone = create_backbone(name, pretrained=True)
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in backbone.state_dict().items())
    record = architecture(backbone, name)
    assert record["architecture"] == "mobilenetv2_100"
    shutil.rmtree(tmp_path / "hf")  # evaluate, predict, export: from the checkpoint, with nothing cached
    rebuilt = rebuild_backbone({"name": name, **record})
    assert rebuilt.state_dict().keys() == backbone.state_dict().keys()
    with pytest.raises(WeightsUnavailable, match="not in the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        create_backbone(name, pretrained=True)


def test_backbones_lists_the_pretrained_names_that_match_with_size_and_parameters(tmp_path):
    from support import run_script

    result = run_script("train", "--backbones", "mobilenetv2_1", cwd=tmp_path)
    assert result.returncode == 0, result.output[-2000:]
    lines = result.output.splitlines()
    assert lines[0].split() == ["backbone.name", "input", "crop", "params"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["mobilenetv2_100.ra_in1k"] == ["224x224", "0.875", "2.2M"]  # 2.2M without the classifier
    assert "mobilenetv2_140.ra_in1k" in rows and not any(name.startswith("resnet") for name in rows)
    assert not list(tmp_path.iterdir())  # no run directory: nothing was trained
