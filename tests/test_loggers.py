"""The loggers: presets alone and together, MLflow read back through its own client (SQLite and file stores, a sweep
side by side, evaluate's figures), W&B offline read back through wandb's own reader, and bad stores refused up front.
Every store is under tmp_path and W&B is offline (conftest): nothing reaches the network."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import support
from support import CONF, ROOT, closed_port, compose, given, run_script
from support.recipes import TWO_EPOCHS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.checks import validate
from finetune.config import LoggerConfig
from finetune.errors import ConfigError
from finetune.loggers import LOGGERS
from finetune.training import run

WANDB = str(Path(sys.executable).parent / "wandb")  # the command-line tool of the environment running the tests


@pytest.fixture(autouse=True)
def wandb_in(tmp_path, monkeypatch):
    """W&B's own folders (settings, cache, staged artifacts) in tmp, and no login: a netrc file that is not there."""
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


train = partial(support.train, recipe=TWO_EPOCHS)


def evaluate_cfg(ckpt):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("evaluate", overrides=[f"ckpt={ckpt}", "num_workers=0"])


def wandb_summary(run_folder) -> dict:
    """The offline run's state, config and latest metrics, as wandb's own reader of .wandb logs gives them."""
    result = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json",
                             str(run_folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def wandb_history(run_folder) -> list[dict]:
    result = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_each_preset_switches_its_own_loggers_and_a_list_composes_several(tmp_path):
    def switches(*overrides):
        cfg = compose(tmp_path, *overrides)
        return {name for name in LOGGERS if cfg.logger[name]}

    assert switches() == {"tensorboard", "csv"}  # the default: logger=tensorboard
    assert switches("logger=none") == set()
    assert switches("logger=csv") == {"csv"}
    assert switches("logger=mlflow") == {"mlflow", "csv"}
    assert switches("logger=wandb") == {"wandb", "csv"}
    assert switches("logger=[tensorboard,mlflow]") == {"tensorboard", "csv", "mlflow"}
    assert switches("logger=[tensorboard,mlflow,wandb]") == {"tensorboard", "csv", "mlflow", "wandb"}
    assert switches("logger.mlflow=true") == {"tensorboard", "csv", "mlflow"}


def test_the_table_of_loggers_is_what_the_schema_presets_and_the_reference_name():
    assert set(LOGGERS) <= set(LoggerConfig.__dataclass_fields__)
    assert {p.stem for p in (CONF / "logger").glob("*.yaml")} == {*LOGGERS, "none"}
    reference = (ROOT / "docs" / "configuration.md").read_text()
    row = next(line for line in reference.splitlines() if line.startswith("| `logger` |"))
    assert set(re.findall(r"`(\w+)`", row)) >= {*LOGGERS, "none", "logger"}
    trackers = (ROOT / "docs" / "tracking.md").read_text().split("### Trackers", 1)[1].split("\n## ", 1)[0]
    for name in ("logger=mlflow", "logger=wandb", "'logger=[tensorboard,mlflow]'", "logger.tracking_uri",
                 "logger.offline", "logger.log_model", "logger.experiment", "mlflow ui --backend-store-uri",
                 "wandb sync"):
        assert name in trackers, name


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, shapes):
    """TensorBoard and MLflow (a SQLite store) on the same run."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    metrics, run_dir = train(tmp, shapes, "logger=[tensorboard,mlflow]", f"logger.tracking_uri={uri}",
                             "logger.experiment=shapes")
    return metrics, run_dir, uri


def test_mlflow_gets_the_metrics_hyperparameters_and_best_checkpoint_that_tensorboard_gets(mlflow_run):
    from mlflow.tracking import MlflowClient

    metrics, run_dir, uri = mlflow_run
    record = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert record["tracking_uri"] == uri
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shapes")
    assert experiment.experiment_id == record["experiment_id"]
    assert experiment.artifact_location == (run_dir.parent / "store" / "mlartifacts" / "shapes").as_uri()
    mlflow_run = client.get_run(record["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == run_dir.name

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("val/acc", "train/loss", "lr/head"):
        history = client.get_metric_history(record["run_id"], name)
        assert [m.step for m in history] == [e.step for e in events.Scalars(name)], name
        assert [m.value for m in history] == pytest.approx([e.value for e in events.Scalars(name)]), name
    assert len(client.get_metric_history(record["run_id"], "val/acc")) == 2
    final = mlflow_run.data.metrics
    assert final["test/acc"] == pytest.approx(metrics["test/acc"])
    assert final["val/acc_best"] == pytest.approx(metrics["val/acc_best"])

    params = mlflow_run.data.params
    assert params["backbone"] == "mobilenetv2_100" and float(params["schedule.lr"]) == 1e-3
    assert params["schedule.epochs"] == "2" and params["image_size"] == "32"
    tags = mlflow_run.data.tags
    assert tags["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert tags["run_dir"] == str(run_dir)
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"metrics.json", "config.yaml"} <= artifacts and "checkpoints" not in artifacts  # no model unless asked


def test_evaluate_logs_its_figures_and_metrics_to_the_runs_mlflow_run(mlflow_run, shapes):
    from mlflow.tracking import MlflowClient

    from finetune.evaluate import run as evaluate

    _, run_dir, uri = mlflow_run
    metrics = evaluate(evaluate_cfg(run_dir / "checkpoints" / "best.ckpt"))
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/metrics.json", "eval/classification_report.txt"} <= logged
    assert "eval/predictions.csv" not in logged  # one row per image: it stays in the run directory
    local = client.download_artifacts(run_id, "eval/metrics.json", str(run_dir.parent / "download"))
    assert json.loads(open(local).read())["accuracy"] == metrics["accuracy"]
    assert client.get_run(run_id).data.metrics["eval/accuracy"] == pytest.approx(metrics["accuracy"])


def test_evaluate_with_its_mlflow_store_out_of_reach_warns_once_and_still_evaluates(mlflow_run, tmp_path, caplog):
    from finetune.evaluate import run as evaluate

    _, run_dir, _ = mlflow_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("eval*"))
    record = json.loads((moved / "trackers.json").read_text())
    record["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{closed_port()}"
    (moved / "trackers.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(evaluate_cfg(moved / "checkpoints" / "best.ckpt"))
    assert metrics["accuracy"] > 0 and (moved / "eval" / "confusion_matrix.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "could not be logged to MLflow" in warnings[0], warnings


def test_mlflow_file_store_with_the_model_uploaded(tmp_path, shapes, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = tmp_path / "mlruns"
    metrics, run_dir = train(tmp_path, shapes, "logger=mlflow", f"logger.tracking_uri={store.as_uri()}",
                             "logger.log_model=true")
    assert (run_dir / "csv").is_dir() and not list(run_dir.glob("events.out.tfevents.*"))  # no TensorBoard
    record = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(store.as_uri())
    assert len(client.get_metric_history(record["run_id"], "val/acc")) == 2
    assert client.get_run(record["run_id"]).data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    logged = {a.path: a.file_size for a in client.list_artifacts(record["run_id"], "checkpoints")}
    assert logged == {"checkpoints/best.ckpt": (run_dir / "checkpoints" / "best.ckpt").stat().st_size}
    assert str(store) in client.get_run(record["run_id"]).info.artifact_uri  # the file store keeps them inside


@pytest.mark.slow  # W&B starts a service process of its own: 8 s of the default suite's 5 minutes
def test_wandb_offline_by_default_holds_the_metrics_config_and_best_checkpoint(tmp_path, shapes, caplog):
    metrics, run_dir = train(tmp_path, shapes, "logger=wandb", "logger.experiment=shapes")
    record = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert record["offline"] is True and record["project"] == "shapes"
    folder = next((run_dir / "wandb").glob("offline-run-*"))  # inside the run directory
    assert folder == run_dir / "wandb" / os.path.basename(record["dir"]) and folder.name.endswith(record["run_id"])
    summary = wandb_summary(folder)
    assert summary["state"] == "finished" and summary["exit_code"] == 0 and summary["name"] == run_dir.name
    assert summary["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert summary["summary"]["val/acc_best"] == pytest.approx(metrics["val/acc_best"])
    assert summary["summary"]["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert summary["config"]["backbone"] == "mobilenetv2_100" and summary["config"]["schedule.lr"] == 1e-3
    val = [h["val/acc"] for h in wandb_history(folder) if "val/acc" in h]
    assert len(val) == 2
    # resumed: W&B cannot continue an offline run, so its second part has a folder of its own, and the log says so
    (run_dir / "metrics.json").unlink()  # as if it had stopped after its second epoch
    cfg = compose(tmp_path / "resumed", f"resume={run_dir}", "schedule.epochs=3")
    with caplog.at_level("WARNING", logger="finetune"):
        run(cfg, overrides=given(cfg))
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(record["run_id"]) for f in folders)
    assert f"W&B cannot continue an offline run (wandb/wandb#4624): the resumed part of run {record['run_id']}" \
        in caplog.text


@pytest.mark.slow  # a run, a resumed run and a new MLflow store: 4 s of the default suite's 5 minutes
def test_a_resumed_run_continues_its_own_mlflow_run(tmp_path, shapes):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, run_dir = train(tmp_path, shapes, "logger=[tensorboard,mlflow]", f"logger.tracking_uri={uri}",
                       "schedule.epochs=1")
    first = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    (run_dir / "metrics.json").unlink()  # as if it had stopped after its first epoch
    cfg = compose(tmp_path / "resumed", f"resume={run_dir}", "schedule.epochs=2", "logger=[tensorboard,mlflow]")
    run(cfg, overrides=given(cfg))
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == first
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("finetune").experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(first, "val/acc")]
    assert len(steps) == 2 and steps[0] < steps[1]  # both epochs, in one run
    assert client.get_run(first).info.status == "FINISHED"
    # the store was MLflow's global one only while the run lasted: the next run's default is the user's again
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != uri


def test_bad_tracker_settings_are_one_line_before_any_work(tmp_path, monkeypatch):
    def check(*overrides):
        return validate(compose(tmp_path / "run", *overrides))

    port = closed_port()
    with pytest.raises(ConfigError, match=rf"logger.tracking_uri=http://127.0.0.1:{port}: no MLflow server answers"):
        check("logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="is a path, not a URI: sqlite:///"):
        check("logger=mlflow", "logger.tracking_uri=outputs/mlruns")
    with pytest.raises(ConfigError, match="ftp://example.invalid/x: MLflow cannot use this store"):
        check("logger=mlflow", "logger.tracking_uri=ftp://example.invalid/x")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot make its folder"):
        check("logger=mlflow", f"logger.tracking_uri=sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="logger.offline=false, but this machine is not logged in to W&B"):
        check("logger=wandb", "logger.offline=false")
    with pytest.raises(ConfigError, match="logger.log_model=true uploads best.ckpt to MLflow or W&B"):
        check("logger=tensorboard", "logger.log_model=true")
    monkeypatch.chdir(tmp_path)
    cfg = check("logger=[mlflow,wandb]")  # the defaults: a SQLite store in ./outputs, W&B offline without a login
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}" and cfg.logger.offline is True


@pytest.mark.slow
def test_readme_sweep_gives_mlflow_runs_side_by_side_and_a_finished_wandb_run_per_job(tmp_path, shapes):
    """The documented sweep command, through the script's entry point (in a folder of its own, the default store
    in ./outputs), with every tracker on: one process runs both jobs, so the first job's W&B run must be finished
    before the second's."""
    from mlflow.tracking import MlflowClient

    result = run_script("train", "-m", "logger=[tensorboard,mlflow,wandb]", "schedule.lr=1e-3,3e-3",
                        "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, cwd=tmp_path)
    output = result.output
    assert result.returncode == 0, output[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert f"MLflow: uv run mlflow ui --backend-store-uri {uri}" in output
    assert f"W&B (offline): uv run wandb sync {sweep.relative_to(tmp_path)}/*/wandb/offline-run-*" in output

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id], order_by=["tags.sweep"])
    assert sorted(r.info.run_name for r in runs) == [f"{sweep.name}/0", f"{sweep.name}/1"]
    assert {r.data.tags["sweep"] for r in runs} == {sweep.name}
    assert sorted(float(r.data.params["schedule.lr"]) for r in runs) == [1e-3, 3e-3]
    for r in runs:
        job = sweep / r.info.run_name.split("/")[1]
        assert r.data.metrics["val/acc_best"] == pytest.approx(json.loads((job / "metrics.json").read_text())
                                                               ["val/acc_best"])
        assert r.info.status == "FINISHED" and list(job.glob("events.out.tfevents.*"))  # TensorBoard too

    wandb_ids = set()
    for job in ("0", "1"):
        folder = next((sweep / job / "wandb").glob("offline-run-*"))
        summary = wandb_summary(folder)
        assert summary["state"] == "finished" and summary["name"] == f"{sweep.name}/{job}"
        assert summary["config"]["schedule.lr"] == [1e-3, 3e-3][int(job)]
        wandb_ids.add(summary["run_id"])
    assert len(wandb_ids) == 2


def test_a_server_that_does_not_answer_stops_the_script_before_training_in_one_line(tmp_path, shapes):
    port = closed_port()
    result = run_script("train", "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{port}",
                        "dataset=image_folder", f"dataset.root={shapes}", *TWO_EPOCHS, cwd=tmp_path)
    output = result.output
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert f"logger.tracking_uri=http://127.0.0.1:{port}: no MLflow server answers there" in output
    assert not list((tmp_path / "outputs" / "runs").glob("*/split.csv"))  # the data was never read


@pytest.mark.slow  # two processes, one creating MLflow's tables while the other waits: 20 s here
def test_runs_started_at_once_into_a_fresh_folder_share_its_new_mlflow_store(tmp_path):
    """Two first runs at once made the second fail in the middle of MLflow's table creation ('Online migration
    expected to match one row'): here two processes open the same new SQLite store together, and each can use it."""
    from multiprocessing import get_context

    from finetune.loggers import probe_store

    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    with get_context("fork").Pool(2) as pool:
        assert pool.map(probe_store, [uri] * 2) == [None, None]
    assert probe_store(uri) is None
