"""The report of a sweep (-m): one row per job in SWEEP_DIR/summary.csv and summary.md, best first.

A Hydra callback (conf/hydra/default.yaml): at the end of every job it records that job in JOB_DIR/job.json and
rewrites the summary, so the report is current even if the sweep is stopped; at the end of the sweep it prints
the table and, last, the best job's overrides, and exits non-zero if any job failed.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import loggers, rundir
from finetune.runconfig import is_rank_zero

log = logging.getLogger(__name__)

COLUMNS = ("job", "overrides", "val_acc_best", "val_acc_best_ci95", "test_acc", "test_acc_ci95", "epochs",
           "wall_time_s", "status", "error", "task", "val_best", "test_map", "test_f1_macro", "test_f1_micro",
           "test_mae", "test_rmse", "test_r2")


def _task(rows: list[dict]):
    """The task of a sweep's jobs (finetune.tasks): its monitored metric and headline test figure name the columns."""
    from finetune.tasks import task_of

    return task_of(next((r.get("task") for r in rows if r.get("task") and r["status"] == "completed"), None))


class SweepReport(Callback):
    def __init__(self) -> None:
        self._started: float | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()
        from finetune import cli

        cli.job_error = None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not is_rank_zero():  # torchrun: rank 0 reports
            return
        from finetune import cli

        job_dir = Path(config.hydra.runtime.output_dir)
        error = cli.job_error
        if job_return.status == JobStatus.FAILED:
            error = error or _one_line(job_return._return_value)
        metrics = {}
        if (job_dir / rundir.METRICS).is_file():
            metrics = json.loads((job_dir / rundir.METRICS).read_text())
        from finetune.tasks import task_of

        task = task_of(metrics.get("task"))
        record = {
            "job": int(config.hydra.job.num),
            "overrides": " ".join(config.hydra.overrides.task),
            "val_acc_best": metrics.get("val/acc_best"),
            "val_acc_best_ci95": metrics.get("val/acc_best_ci95"),
            "test_acc": metrics.get("test/acc"),
            "test_acc_ci95": metrics.get("test/acc_ci95"),
            "epochs": metrics.get("epochs"),
            "wall_time_s": round(time.time() - self._started, 1) if self._started else None,
            "status": "failed" if error else "completed",
            "error": error or "",
            # K-fold: the fold, and the overrides without it, which the folds of one setting share
            "fold": int(config.dataset.fold) if config.dataset.get("folds") else None,
            "setting": " ".join(o for o in config.hydra.overrides.task
                                if o.split("=", 1)[0].lstrip("+~") != "dataset.fold"),
            # the task's own figures: the monitored metric's best (val/acc_best, val/map_best, val/mae_best) and
            # its test figures
            "task": metrics.get("task") or (task.name if metrics else None),  # none known for a failed job
            "val_best": metrics.get(f"{task.monitor}_best"),
            **{key.replace("/", "_"): metrics.get(key) for key in ("test/map", "test/f1_macro", "test/f1_micro",
                                                                    "test/mae", "test/rmse", "test/r2")},
        }
        (job_dir / "job.json").write_text(json.dumps(record, indent=2) + "\n")
        rows = write_summary(Path(config.hydra.sweep.dir))
        done = [r for r in rows if r["status"] == "completed"]
        if done and _best(done[0]) is not None:
            log.info("Sweep so far: %d jobs (%d failed); best %s_best %.4f with %s", len(rows), len(rows) - len(done),
                     _task(rows).monitor, _best(done[0]), done[0]["overrides"] or "(defaults)")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():  # under torchrun each process runs the sweep's jobs; rank 0 alone reports them
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if not rows:
            return
        print((sweep_dir / "summary.md").read_text())
        failed = [r for r in rows if r["status"] != "completed"]
        best = next((r for r in rows if r["status"] == "completed"), None)
        folds = " and folds.csv (mean and std over the folds)" if (sweep_dir / "folds.csv").is_file() else ""
        print(f"Summary: {sweep_dir / 'summary.csv'}, summary.md{folds}")
        for line in loggers.hints(config.logger, sweep_dir, sweep=True):
            print(line)
        if best is not None and _best(best) is not None:
            task = _task(rows)
            test = _test(best, task)
            tested = f", {task.headline[0]} {test:.4f}" if test is not None else ", no test split"
            print(f"Best job ({best['job']}, {task.monitor}_best {_best(best):.4f}{tested}): "
                  f"{best['overrides'] or '(defaults)'}")
        if failed:
            log.error("%d of %d jobs failed: %s", len(failed), len(rows),
                      "; ".join(f"job {r['job']}: {r['error']}" for r in failed))
            sys.exit(1)


def write_summary(sweep_dir: Path) -> list[dict]:
    """Gather SWEEP_DIR/*/job.json into summary.csv and summary.md, best val/acc_best first, failed jobs last."""
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob("*/job.json")]
    task = _task(rows)
    sign = -1 if task.mode == "max" else 1
    rows.sort(key=lambda r: (r["status"] != "completed", _best(r) is None, sign * (_best(r) or 0.0), r["job"]))
    tmp = sweep_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    tmp.replace(sweep_dir / "summary.csv")
    intervals = " (95% CI)" if task.one_class_per_image else ""
    lines = [f"| job | overrides | {task.monitor}_best{intervals} | {task.headline[0]}{intervals} | epochs | wall time "
             f"| status |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if r["status"] == "completed" else f"failed: {r['error']}"
        lines.append(f"| {r['job']} | {r['overrides'] or '(defaults)'} | "
                     f"{_with_interval(_best(r), r.get('val_acc_best_ci95'))} | "
                     f"{_with_interval(_test(r, task), r.get('test_acc_ci95'))} | "
                     f"{r['epochs'] if r['epochs'] is not None else ''} | {_seconds(r['wall_time_s'])} | {status} |")
    lines += ["", *_not_told_apart(rows), *_over_folds(rows, sweep_dir, task)]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def _best(row: dict) -> float | None:
    """A job's best value of its monitored metric (val/acc_best for jobs recorded before tasks)."""
    return row.get("val_best", row.get("val_acc_best"))


def _test(row: dict, task) -> float | None:
    """A job's headline test figure: test/acc, test/map or test/mae."""
    return row.get(task.headline[0].replace("/", "_"))


FOLD_COLUMNS = ("overrides", "folds", "val_acc_best_mean", "val_acc_best_std", "test_acc_mean", "test_acc_std")


def _over_folds(rows: list[dict], sweep_dir: Path, task=None) -> list[str]:
    """A K-fold sweep (dataset.fold=range(K)): mean and standard deviation of val/acc_best and test/acc over the
    completed folds of each setting (the other overrides), best mean first, in summary.md and folds.csv."""
    settings: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("fold") is not None and r["status"] == "completed":
            settings.setdefault(r["setting"], []).append(r)
    if not settings:
        return []
    task = task or _task(rows)
    table = []
    for setting, done in settings.items():
        val = [_best(r) for r in done if _best(r) is not None]
        test = [_test(r, task) for r in done if _test(r, task) is not None]
        table.append({"overrides": setting, "folds": len(done), "val_acc_best_mean": mean(val) if val else None,
                      "val_acc_best_std": stdev(val) if len(val) > 1 else None,
                      "test_acc_mean": mean(test) if test else None,
                      "test_acc_std": stdev(test) if len(test) > 1 else None})
    sign = -1 if task.mode == "max" else 1
    table.sort(key=lambda t: sign * (t["val_acc_best_mean"] or 0.0))
    # columns named after the task's figures: val_acc_best_mean ... test_acc_std, val_mae_best_mean ... test_mae_std
    names = {"val_acc_best": f"{task.monitor.replace('/', '_')}_best",
             "test_acc": task.headline[0].replace("/", "_")}
    columns = [next((column.replace(old, new) for old, new in names.items() if column.startswith(old)), column)
               for column in FOLD_COLUMNS]
    with open(sweep_dir / "folds.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([t[column] for column in FOLD_COLUMNS] for t in table)
    tested = any(t["test_acc_mean"] is not None for t in table)
    lines = ["", "Over the folds (mean ± standard deviation of the completed folds, n - 1 in its denominator; " + (
             "every fold is tested on the same test split):" if tested else
             f"no test split (dataset.test_fraction=0), so no test figures: each fold's {task.monitor}_best chose its "
             "own checkpoint and is optimistic):"), "",
             f"| overrides | folds | {task.monitor}_best | {task.headline[0]} |", "|---|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['overrides'] or '(defaults)'} | {t['folds']} | "
                     f"{_plus_minus(t['val_acc_best_mean'], t['val_acc_best_std'])} | "
                     f"{_plus_minus(t['test_acc_mean'], t['test_acc_std'])} |")
    return lines


def _plus_minus(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _not_told_apart(rows: list[dict]) -> list[str]:
    """A sentence naming the jobs whose val/acc_best interval overlaps the best job's: on this validation set they
    are not shown to be worse, whatever their order in the table."""
    from finetune.stats import overlaps

    done = [r for r in rows if r["status"] == "completed" and r.get("val_acc_best_ci95")]
    if len(done) < 2:
        return []
    best = done[0]
    tied = [str(r["job"]) for r in done[1:] if overlaps(r["val_acc_best_ci95"], best["val_acc_best_ci95"])]
    intervals = "Intervals are 95% Wilson intervals over the images of each split."
    if not tied:
        return [f"{intervals} No other job's val/acc_best interval overlaps job {best['job']}'s."]
    jobs = ", ".join(tied)
    return [f"{intervals} The val/acc_best intervals of job{'s' if len(tied) > 1 else ''} {jobs} overlap job "
            f"{best['job']}'s: on this validation set they are not shown to differ from it."]


def _with_interval(x: float | None, interval: list[float] | None) -> str:
    if x is None:
        return ""
    return f"{x:.4f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{x:.4f}"


def _seconds(x: float | None) -> str:
    return f"{x:.0f} s" if x is not None else ""


def _one_line(error: Any) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
