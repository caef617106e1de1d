"""Temperature scaling: fitted on held-out logits it lowers NLL and ECE of an over-confident model; a run stores it
where evaluate, predict and export read it."""

import json

import numpy as np
import pytest
import torch

from finetune.calibration import ece, fit_temperature, nll, rescale, why_not_fitted


def overconfident(n, k=4, seed=0):
    """Logits 4x too large: the labels are drawn from softmax(z), so softmax(z) is calibrated and softmax(4z),
    what this model says, is over-confident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * 4, labels


def test_a_temperature_fitted_on_validation_logits_lowers_nll_and_ece_on_held_out_ones():
    val_logits, val_labels = overconfident(600, seed=1)
    test_logits, test_labels = overconfident(600, seed=2)
    t = fit_temperature(val_logits, val_labels)
    assert 3 < t < 5  # the logits were made 4x too large
    labels = test_labels.numpy()
    before, after = test_logits.softmax(1).numpy(), (test_logits / t).softmax(1).numpy()
    assert nll(after, labels) < nll(before, labels) * 0.8
    assert ece(after, labels) < ece(before, labels) / 2
    assert (after.argmax(1) == before.argmax(1)).all()  # no prediction changes
    assert np.allclose(rescale(before, t), after, atol=1e-5)  # from probabilities at T = 1 alone


def test_a_validation_split_without_errors_leaves_the_temperature_at_1():
    """Every validation image right: the NLL only falls as T goes to 0, so a fit would make every probability
    one-hot (what a fine-tuned model on an easy 60-image val split gives); T stays 1 instead."""
    logits, labels = overconfident(200, seed=3)
    right = logits.argmax(1)
    assert fit_temperature(logits, right) == 1.0
    assert fit_temperature(logits, labels) != 1.0  # with errors it is fitted


def test_too_few_validation_images_or_errors_or_one_class_leave_the_temperature_at_1_and_say_why():
    """A T fitted on a handful of images follows them (T=0.19 on 6 images made the test NLL worse): not fitted."""
    logits, labels = overconfident(200, seed=4)
    assert why_not_fitted(logits, labels) is None
    assert fit_temperature(logits[:8], labels[:8]) == 1.0
    assert "has 8 images, fewer than the 30" in why_not_fitted(logits[:8], labels[:8])
    one_class = labels == labels[0]
    assert "all of one class" in why_not_fitted(logits[one_class], labels[one_class])
    assert fit_temperature(logits[one_class], labels[one_class]) == 1.0
    predicted = logits.argmax(1)
    two_wrong = predicted.clone()
    two_wrong[:2] = (predicted[:2] + 1) % logits.shape[1]
    assert "only 2 of the 200" in why_not_fitted(logits, two_wrong)
    assert fit_temperature(logits, two_wrong) == 1.0
    one_hot = nll(np.array([[1.0, 0.0]]), np.array([0]))
    assert one_hot == 0.0 and str(one_hot) == "0.0"  # not -0.0 in metrics.json


def test_a_run_calibrates_and_predict_evaluate_and_export_use_its_temperature(tmp_path, shapes):
    from support import FAST, compose, given

    from finetune.export import load_exported
    from finetune.export import run as export
    from finetune.inference import probabilities
    from finetune.models.module import load_module
    from finetune.training import run

    cfg = compose(tmp_path / "run", "dataset=image_folder", f"dataset.root={shapes}", *FAST, "logger=none",
                  "schedule.epochs=1", "schedule.freeze_epochs=1", "dataset.val_fraction=0.3")  # 36 val images
    # after one epoch of the head alone: errors enough (at least 3) for a temperature to be fitted
    metrics = run(cfg, overrides=given(cfg))
    t = metrics["val/temperature"]
    assert t > 0 and t != 1.0 and json.loads((tmp_path / "run" / "metrics.json").read_text())["val/temperature"] == t
    # both recorded (whether T helps on held-out images is the over-confident model's test above; on 36 validation
    # images of a model one epoch old it may not)
    assert all(np.isfinite(metrics[k]) for k in ("test/nll_before", "test/nll_after", "test/ece_before",
                                                  "test/ece_after"))
    model = load_module(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert model.temperature == pytest.approx(t)
    from finetune.data.readers import read_source

    source = read_source("image_folder", str(shapes))
    indices = np.arange(0, len(source), 10)
    calibrated, _ = probabilities(model, source, indices)
    raw, _ = probabilities(model, source, indices, temperature=1.0)
    assert np.allclose(calibrated, rescale(raw, t), atol=1e-5)  # as the temperature says
    # the export (TorchScript here; test_tools checks an ONNX model's probabilities at a checkpoint's temperature)
    out = tmp_path / "model.pt"
    from test_tools import tool_cfg

    export(tool_cfg("export", ckpt=tmp_path / "run", format="torchscript", out=out))
    assert json.loads(out.with_suffix(".json").read_text())["temperature"] == pytest.approx(t)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = (model(images) / t).softmax(1).numpy()
    assert np.abs(load_exported(out, "torchscript")(images.numpy()) - expected).max() < 1e-4
