"""Every training recipe the tests use, each defined once under a name that says what it is, and the one way a
test says that a run learnt: a margin over a baseline computed in the test, counted in images.

The margins were set from the spread `uv run benchmarks/arithmetics.py` measured: each learning test (marked
`learning`) run under four arithmetics of one machine (native; ATEN_CPU_CAPABILITY=default;
ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2; OMP_NUM_THREADS=1, which changes the order of reductions as
another core count does) and several seeds (FINETUNE_TEST_SEED), since a machine's arithmetic moves a short run
about as much as its seed does. The measured values are written beside each assertion."""

from __future__ import annotations

import json
import os

# Small, fast and quiet: every training test runs at 32 px on the CPU without a progress bar. FINETUNE_TEST_SEED
# (set by benchmarks/arithmetics.py) gives every run another seed, to measure how far a result moves.
FAST = [
    "dataset.image_size=32", "dataset.num_workers=0", "dataset.batch_size=16", "trainer.accelerator=cpu",
    "trainer.devices=1", "callbacks.progress_bar=false", "+trainer.enable_model_summary=false",
    "backbone.pretrained=false", "trainer.log_every_n_steps=2", "callbacks.dashboards.enabled=false",
    *([f"seed={os.environ['FINETUNE_TEST_SEED']}"] if os.environ.get("FINETUNE_TEST_SEED") else []),
]

# A fifth of the images for validation and a fifth for test: 24 test images of the 120 of the `shapes` fixture.
FIFTHS = ["dataset.val_fraction=0.2", "dataset.test_fraction=0.2"]

# A random backbone, its features probed by the head, then unfrozen at 3% of the head's rate: learns the colour
# classes of `shapes` in seconds (the two-phase default's form, on a backbone with nothing to protect).
PROBE_THEN_UNFREEZE = [*FAST, "schedule.lr=3e-3", "schedule.backbone_lr_ratio=0.03", *FIFTHS]

# Two epochs, the first frozen: a whole run with both phases where a test checks bookkeeping, not learning.
TWO_EPOCHS = [*FAST, "schedule.epochs=2", "schedule.freeze_epochs=1", *FIFTHS]

# Everything trains from the first step at 1e-2 for 8 epochs, uncalibrated, logged as CSV: a random backbone that
# learns the colours of `shapes` end to end, for the readers' tests (the data must reach training as labelled).
FROM_SCRATCH = [*FAST, "schedule.epochs=8", "schedule.freeze_epochs=0", "schedule.lr=1e-2",
                "schedule.backbone_lr_ratio=1", "calibrate=false", "logger=csv"]

# The tasks' recipe: FROM_SCRATCH's rates at batch 32 for 14 epochs, for several labels or a number per image.
TASKS = [*FAST, "schedule.freeze_epochs=0", "schedule.backbone_lr_ratio=1", "calibrate=false", "dataset.batch_size=32",
         "schedule.lr=1e-2", "logger=csv", "schedule.epochs=14"]


def record(what: str, value: float, baseline: float | None, needed: float) -> None:
    """Append a learning test's figure to $FINETUNE_SPREAD (benchmarks/arithmetics.py reads it), if set."""
    path = os.environ.get("FINETUNE_SPREAD")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "value": value, "baseline": baseline,
                                "needed": needed}) + "\n")


def assert_at_most(what: str, value: float, limit: float) -> None:
    """`value` at most `limit`: a difference between two code paths (an export's accuracy drop, say)."""
    record(what, value, None, limit)
    assert value <= limit, f"{what}: {value:.4g}, more than {limit:.4g}"


def correct_of(accuracy: float, images: int) -> int:
    """The number of images an accuracy over `images` images counts."""
    return round(accuracy * images)


def assert_above_chance(metrics: dict, margin: int, classes: int, key: str = "test/acc",
                        images_key: str = "test_images") -> None:
    """At least `margin` images more than chance (a uniform guess over `classes`) right of `metrics[images_key]`."""
    images = metrics[images_key]
    right, chance = correct_of(metrics[key], images), images / classes
    record(key, right, chance, chance + margin)
    assert right >= chance + margin, (f"{key}: {right} of {images} images right; chance is {chance:.1f}, the test "
                                      f"asks for {margin} more")


def assert_above(what: str, value: float, baseline: float, margin: float) -> None:
    """`value` at least `margin` above a `baseline` computed in the test (a label's frequency, say)."""
    record(what, value, baseline, baseline + margin)
    assert value >= baseline + margin, (f"{what}: {value:.4f}; the baseline is {baseline:.4f}, the test asks "
                                        f"{margin} more")


def assert_below(what: str, value: float, baseline: float, fraction: float) -> None:
    """`value` (an error) at most `fraction` of a `baseline` computed in the test (predicting the mean, say)."""
    record(what, value, baseline, baseline * fraction)
    assert value <= baseline * fraction, (f"{what}: {value:.4f}; the baseline is {baseline:.4f}, the test asks for "
                                          f"at most {fraction} of it")


def assert_agree(a: float, b: float, images: int, what: str = "accuracy", differ: int = 1) -> None:
    """Two code paths' accuracies over the same `images` images differ by at most `differ` images: an image on a
    class boundary may fall either way under two batchings' rounding, a real disagreement moves more."""
    apart = abs(correct_of(a, images) - correct_of(b, images))
    assert apart <= differ, f"{what}: {a:.4f} against {b:.4f} over {images} images: {apart} images apart"


# FreezeRecorder (support.recorders) watching a run: what trains, BatchNorm's mode and the rates at every step.
RECORD_FREEZING = "callbacks.extra=[{_target_: support.recorders.FreezeRecorder}]"

# The one trained run that the tools', training and reliability tests share (support.trained_once trains it once a
# session): PROBE_THEN_UNFREEZE for 6 epochs, 3 of them frozen, watched by FreezeRecorder, with the dashboards.
COLOURS = [*PROBE_THEN_UNFREEZE, "schedule.epochs=6", "schedule.freeze_epochs=3", "callbacks.dashboards.enabled=true",
           "callbacks.dashboards.every_n_epochs=3", RECORD_FREEZING]


def most_agree(a: dict, b: dict, differ: int = 1) -> None:
    """Two code paths' predictions of the same images (image -> label) agree on all but at most `differ` of them."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    apart = [(k, a[k], b[k]) for k in a if a[k] != b[k]]
    assert len(apart) <= differ, f"{len(apart)} of {len(a)} predictions differ: {apart[:5]}"
