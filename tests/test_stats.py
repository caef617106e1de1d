"""Confidence intervals: the Wilson interval's values and coverage, and where runs, evaluate and sweeps report them."""

import json

import numpy as np
import pytest

from finetune.stats import accuracy_interval, overlaps, wilson
from finetune.sweep import write_summary


def test_wilson_gives_the_textbook_values_and_stays_in_zero_one():
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), pytest.approx(1.0))
    low, high = wilson(81, 100)
    assert (low, high) == (pytest.approx(0.7222, abs=1e-4), pytest.approx(0.8749, abs=1e-4))
    assert wilson(0, 0) is None and accuracy_interval(float("nan"), 10) is None


def test_wilson_covers_the_true_accuracy_95_times_in_100_on_small_sets():
    rng = np.random.default_rng(0)
    for n, p in ((30, 0.9), (65, 0.7), (200, 0.97)):
        hits = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson(int(k), n) for k in hits)])
        assert covered >= 0.93, (n, p, covered)


def test_the_sweep_summary_shows_intervals_and_names_the_jobs_not_told_apart(tmp_path):
    jobs = [(0, 0.80, 65), (1, 0.86, 65), (2, 0.60, 65)]
    for job, acc, n in jobs:
        (tmp_path / str(job)).mkdir()
        record = {"job": job, "overrides": f"schedule.lr={job}", "val_acc_best": acc,
                  "val_acc_best_ci95": accuracy_interval(acc, n), "test_acc": acc - 0.01,
                  "test_acc_ci95": accuracy_interval(acc - 0.01, n), "epochs": 3, "wall_time_s": 1.0,
                  "status": "completed", "error": ""}
        (tmp_path / str(job) / "job.json").write_text(json.dumps(record))
    rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == [1, 0, 2]
    text = (tmp_path / "summary.md").read_text()
    low, high = accuracy_interval(0.86, 65)
    assert f"| 1 | schedule.lr=1 | 0.8600 [{low:.3f}, {high:.3f}] |" in text
    assert overlaps(accuracy_interval(0.80, 65), accuracy_interval(0.86, 65))
    assert not overlaps(accuracy_interval(0.60, 65), accuracy_interval(0.86, 65))
    assert "The val/acc_best intervals of job 0 overlap job 1's: on this validation set they are not shown to " \
           "differ from it." in text
