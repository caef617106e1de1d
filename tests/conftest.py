import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the network: the Hugging Face hub (timm's weights) is told it is offline, W&B
# writes its runs to disk only, and MLflow has no server of the user's to reach (tests give their own local stores).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_ERROR_REPORTING"] = "false"
for _key in ("WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_key, None)

from support import _COMPOSED  # noqa: E402
from support.fabricate import make_dogs_vs_cats, make_image_folder  # noqa: E402
from support.recorders import BatchKinds, FreezeRecorder, HeadRecorder  # noqa: E402


@pytest.fixture(autouse=True)
def forget_recorders():
    """Tests find the recorders they plug in through their class. Lightning hands every callback the model's log
    method, so a recorder kept past its test would keep that model alive: each test starts and ends without any."""
    for recorder in (FreezeRecorder, BatchKinds, HeadRecorder):
        recorder.instances.clear()
    yield
    for recorder in (FreezeRecorder, BatchKinds, HeadRecorder):
        recorder.instances.clear()
    _COMPOSED.clear()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A three-class image folder, 40 images per class, with a space in one class name."""
    root = tmp_path_factory.mktemp("shapes")
    return make_image_folder(root, {"red": "red", "green": "green", "not red or green": "blue"}, per_class=40)


@pytest.fixture(scope="session")
def lite0(tmp_path_factory) -> Path:
    """Real ImageNet weights: EfficientNet-Lite0 (a dev dependency) in timm's tf_efficientnet_lite0 layout, as a
    file for backbone.weights=."""
    from pretrained import lite0_weights

    return lite0_weights(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.in1k.pth")


@pytest.fixture(scope="session")
def dogs_vs_cats(tmp_path_factory) -> Path:
    return make_dogs_vs_cats(tmp_path_factory.mktemp("dogs-vs-cats"), per_class=40)


@pytest.fixture(scope="session")
def colours_run(tmp_path_factory, shapes):
    """support.recipes.COLOURS on `shapes`, trained once a session; call it with a folder for a copy of the run."""
    from support import trained_once
    from support.recipes import COLOURS

    return trained_once(tmp_path_factory, shapes, COLOURS, {})
