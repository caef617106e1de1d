import os
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach the network: the Hugging Face hub (timm's weights) is told it is offline, W&B
# writes its runs to disk only, and MLflow has no server of the user's to reach (tests give their own local stores).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_ERROR_REPORTING"] = "false"
for _key in ("WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_key, None)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))  # pretrained.py: the real ImageNet weights of the dev dependencies

from fabricate import make_dogs_vs_cats, make_image_folder  # noqa: E402
from recorders import BatchKinds, FreezeRecorder, HeadRecorder  # noqa: E402

# Small, fast and quiet: every training test runs at 32 px on the CPU without a progress bar.
FAST = [
    "dataset.image_size=32", "dataset.num_workers=0", "dataset.batch_size=16", "trainer.accelerator=cpu",
    "trainer.devices=1", "callbacks.progress_bar=false", "+trainer.enable_model_summary=false",
    "backbone.pretrained=false", "trainer.log_every_n_steps=2", "callbacks.dashboards.enabled=false",
]


_COMPOSED: list = []


def compose(run_dir: Path, *overrides: str):
    """conf/train.yaml composed with `overrides`, writing into `run_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.config  # noqa: F401  (the schema conf/train.yaml builds on)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"run_dir={run_dir}", *overrides])
    _COMPOSED.append((cfg, list(overrides)))
    return cfg


def given(cfg) -> list[str]:
    """The overrides `cfg` was composed with: what finetune.train.run gets as the command line, as the script does."""
    return next(overrides for composed, overrides in reversed(_COMPOSED) if composed is cfg)


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


def run_script(name: str, *args: str, cwd: Path) -> int:
    """scripts/NAME.py with `args` as its command line, in this process, through its own entry point and argument
    parsing (Hydra's); its exit status."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    argv, here = sys.argv, os.getcwd()
    sys.argv = [str(ROOT / "scripts" / f"{name}.py"), *args]
    GlobalHydra.instance().clear()
    try:
        os.chdir(cwd)
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
        GlobalHydra.instance().clear()


def wait_for(path, process, timeout=300):
    """Wait until `path` exists while `process` (a Popen with stdout piped) still runs; fail with its output if not."""
    import time

    started = time.time()
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() - started < timeout, f"{path} did not appear"
        time.sleep(0.05)


def sigterm_after_first_checkpoint(process, run_dir):
    """Wait for the training `process` to write RUN_DIR's first last.ckpt (its first epoch), let it go on for a
    second, send it SIGTERM and check it exits with 143; the global step of that first checkpoint, and the output."""
    import signal
    import time

    import torch

    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    return step, output
