"""Where a run's metrics go: one table, LOGGERS, that the config check, the Trainer's builder and README read.

TensorBoard and CSV write into the run directory. MLflow and Weights & Biases are the trackers a lab compares runs
in: each run is one tracker run with the same metrics and hyperparameters that TensorBoard gets and the best
checkpoint's path, and RUN_DIR/trackers.json says where that run is (evaluate logs its figures to it, resume
continues it). Lightning and the trackers' packages are imported only when a logger is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig

from finetune import rundir
from finetune.errors import ConfigError, require_extra

log = logging.getLogger(__name__)

RECORD = rundir.TRACKERS  # RUN_DIR/trackers.json: the run's MLflow and W&B runs
DEFAULT_STORE = Path("outputs") / "mlflow.db"  # beside outputs/runs and outputs/sweeps: one store for every run
PROBE_TIMEOUT_S = 5.0
# The user's own MLFLOW_TRACKING_URI, read before any run: Lightning's MLFlowLogger sets it to the run's store
# (mlflow.set_tracking_uri), which must not become the default of the next job of a sweep.
GIVEN_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class Logger:
    build: Callable[[DictConfig, Path, dict], Any]  # (cfg, run_dir, the run's earlier trackers.json) -> its logger
    check: Callable[[DictConfig], None] | None = None  # before any work: resolves defaults, probes the store
    extra: str | None = None  # the optional extra (pyproject.toml) that installs it, and its module
    module: str | None = None


def _tensorboard(cfg: DictConfig, run_dir: Path, earlier: dict):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)


def _csv(cfg: DictConfig, run_dir: Path, earlier: dict):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=run_dir, name="csv")


def _mlflow(cfg: DictConfig, run_dir: Path, earlier: dict):
    from lightning.pytorch.loggers import MLFlowLogger

    s = cfg.logger
    uri = s.tracking_uri
    _allow_file_store(uri)
    run_id = earlier.get("mlflow", {}).get("run_id") if earlier.get("mlflow", {}).get("tracking_uri") == uri else None
    if run_id is not None and not _mlflow_run_exists(uri, run_id):
        log.warning("MLflow run %s of this run is not in %s any more: the resumed run starts a new one", run_id, uri)
        run_id = None
    name, tags = run_identity(s, run_dir)
    return MLFlowLogger(experiment_name=s.experiment, run_name=name, tracking_uri=uri, tags=tags, run_id=run_id)


def _wandb(cfg: DictConfig, run_dir: Path, earlier: dict):
    from lightning.pytorch.loggers import WandbLogger

    s = cfg.logger
    name, tags = run_identity(s, run_dir)
    run_id = earlier.get("wandb", {}).get("run_id")
    if run_id is not None and s.offline:
        log.warning("W&B cannot continue an offline run (wandb/wandb#4624): the resumed part of run %s is logged to a "
                    "folder of its own beside the first, %s/offline-run-*-%s; each holds its part, and the run's "
                    "TensorBoard events and metrics.json hold the whole run", run_id, run_dir / "wandb", run_id)
    logger = WandbLogger(name=name, save_dir=str(run_dir), project=s.experiment, id=run_id,
                         mode="offline" if s.offline else "online", group=tags.get("sweep"), job_type="train",
                         notes=tags.get("overrides"))
    logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which wandb now warns is deprecated
    return logger


def _check_mlflow(s: DictConfig) -> None:
    """logger.tracking_uri resolved to an absolute URI (so evaluate, run from anywhere, finds the store), and the
    store opened: a bad URI or a server that does not answer is one line now, not a traceback after an epoch."""
    s.tracking_uri = resolve_tracking_uri(s.tracking_uri)
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:  # a DDP worker: rank 0 has checked, and only rank 0 logs
        return
    problem = probe_store(s.tracking_uri)
    if problem:
        raise ConfigError(f"logger.tracking_uri={s.tracking_uri}: {problem}")
    _make_experiment(s.tracking_uri, s.experiment)


def _check_wandb(s: DictConfig) -> None:
    """logger.offline resolved (null: offline unless logged in), and an online run refused up front when there is no
    login or no way to W&B's server: wandb.init would otherwise ask for a key, or retry for a minute and a half."""
    logged_in = wandb_logged_in()
    if s.offline is None:
        s.offline = _offline_by_default()
        if s.offline:
            log.info("W&B logs offline into RUN_DIR/wandb (%s): upload it later with `uv run wandb sync`",
                     "WANDB_MODE" if logged_in else "this machine is not logged in to W&B")
    if s.offline or int(os.environ.get("LOCAL_RANK", 0)) > 0:
        return
    if not logged_in:
        raise ConfigError("logger.offline=false, but this machine is not logged in to W&B (no WANDB_API_KEY, no "
                          "api.wandb.ai in ~/.netrc): `uv run wandb login`, or log offline (logger.offline=true) and "
                          "`uv run wandb sync` later")
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    problem = _connects(host.hostname or "api.wandb.ai", host.port or (80 if host.scheme == "http" else 443))
    if problem:
        raise ConfigError(f"logger.wandb: W&B's server {host.geturl()} cannot be reached ({problem}): log offline "
                          "with logger.offline=true and `uv run wandb sync` later")


# logger.NAME switches each on; conf/logger/NAME.yaml is its preset; README's `logger` row and Trackers name them all.
LOGGERS: dict[str, Logger] = {
    "tensorboard": Logger(_tensorboard),  # events in RUN_DIR: curves, HPARAMS, the dashboards' images
    "csv": Logger(_csv),  # the same scalars in RUN_DIR/csv (evaluate's curves.png reads them)
    "mlflow": Logger(_mlflow, _check_mlflow, "mlflow", "mlflow"),  # a run in logger.tracking_uri (default:
    # outputs/mlflow.db, shared)
    "wandb": Logger(_wandb, _check_wandb, "wandb", "wandb"),  # a run in project logger.experiment; offline in
    # RUN_DIR/wandb if this machine is not logged in
}


def check(s: DictConfig) -> None:
    """The logger settings, before any work: what the trackers share, then each switched-on logger's own check."""
    if s.log_model and not (s.mlflow or s.wandb):
        raise ConfigError("logger.log_model=true uploads best.ckpt to MLflow or W&B: switch one on (logger.mlflow=true "
                          "or logger.wandb=true)")
    if (s.mlflow or s.wandb) and not str(s.experiment).strip():
        raise ConfigError("logger.experiment must name the MLflow experiment / W&B project (default: finetune)")
    for name, entry in LOGGERS.items():
        if s[name] and entry.extra is not None:
            require_extra(entry.extra, f"logger={name}", (entry.module,))
        if s[name] and entry.check is not None:
            entry.check(s)


def build(cfg: DictConfig, run_dir: Path, resuming: bool) -> list:
    """The Lightning loggers that cfg.logger switches on, in the table's order; a resumed run continues its own
    tracker runs."""
    earlier = read_record(run_dir) if resuming else {}
    return [entry.build(cfg, run_dir, earlier) for name, entry in LOGGERS.items() if cfg.logger[name]]


def run_identity(s: DictConfig, run_dir: Path) -> tuple[str, dict[str, str]]:
    """The tracker run's name (logger.run_name, else the run directory's name; SWEEP/JOB for a job of a sweep) and
    its tags: the run directory and, in a sweep, the sweep and this job's overrides, to filter and compare by."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name, tags = run_dir.name, {"run_dir": str(run_dir.resolve())}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = Path(HydraConfig.get().sweep.dir).name
        name, tags["sweep"] = f"{sweep}/{run_dir.name}", sweep
        tags["overrides"] = " ".join(HydraConfig.get().overrides.task)
    return s.run_name or name, tags


def start(trainer, run_dir: Path, hyperparameters: dict | None) -> None:
    """Give each tracker this run's hyperparameters (the ones TensorBoard's HPARAMS gets; none when resuming: the
    run has them), and write RUN_DIR/trackers.json: where its tracker runs are."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    if trainer.global_rank != 0:
        return
    record = {}
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            record["mlflow"] = {"tracking_uri": logger._tracking_uri, "experiment": logger._experiment_name,
                                "experiment_id": logger.experiment_id, "run_id": logger.run_id}
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            record["wandb"] = {"project": run.project, "run_id": run.id, "offline": bool(run.offline),
                               "dir": str(Path(run.dir).parent)}
        else:
            continue
        if hyperparameters is not None:
            logger.log_hyperparams(hyperparameters)
    if record:
        path = run_dir / RECORD
        path.write_text(json.dumps({**read_record(run_dir), **record}, indent=2) + "\n")


@contextlib.contextmanager
def ended(trainer, run_dir: Path, log_model: bool) -> Iterator[None]:
    """Around fit and test: at the end, each tracker gets the best checkpoint's path (the file too with
    logger.log_model), metrics.json and config.yaml, and its run is ended, finished or failed: the next job of a
    sweep, in the same process, starts runs of its own."""
    from finetune.errors import Interrupted, Preempted

    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit, Interrupted, Preempted):
        status = "KILLED"
        raise
    finally:
        _end(trainer, run_dir, status, log_model)


def _end(trainer, run_dir: Path, status: str, log_model: bool) -> None:
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    metrics = _read_json(run_dir / rundir.METRICS) if status == "FINISHED" else {}
    best = run_dir / metrics["best_checkpoint"] if metrics.get("best_checkpoint") else None
    for logger in trainer.loggers if trainer.global_rank == 0 else []:
        try:
            if isinstance(logger, MLFlowLogger) and logger._initialized:
                client, run_id = logger.experiment, logger.run_id
                if best is not None:
                    client.set_tag(run_id, "best_checkpoint", str(best.resolve()))
                    if log_model:
                        client.log_artifact(run_id, str(best), rundir.CHECKPOINTS)
                for name in (rundir.METRICS, rundir.CONFIG):
                    if status == "FINISHED" and (run_dir / name).is_file():
                        client.log_artifact(run_id, str(run_dir / name))
                client.set_terminated(run_id, status)
                import mlflow

                mlflow.set_tracking_uri(GIVEN_TRACKING_URI)  # None: unset again
            elif isinstance(logger, WandbLogger) and logger._experiment is not None:
                run = logger.experiment
                if best is not None:
                    run.summary["best_checkpoint"] = str(best.resolve())
                    if log_model:
                        import wandb

                        artifact = wandb.Artifact(f"model-{run.id}", type="model",
                                                  metadata={key: value for key, value in metrics.items()
                                                            if key.startswith("val/") and key.endswith("_best")})
                        artifact.add_file(str(best), name=rundir.BEST)
                        run.log_artifact(artifact, aliases=["best"])
        except Exception as e:  # the run itself is done and on disk: a tracker that fails now costs a warning
            log.warning("Could not finish the %s run: %s", type(logger).__name__.replace("Logger", ""),
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code={"FINISHED": 0, "KILLED": 130}.get(status, 1))


def log_evaluation(run_dir: Path, out: Path, metrics: dict) -> None:
    """Log evaluate's figures, metrics.json and report to the run's MLflow run (RUN_DIR/trackers.json) under
    OUT's name, and its numbers as OUT/metric. Failing to (no such run, a store out of reach) is one warning."""
    record = read_record(run_dir).get("mlflow")
    if not record:
        return
    uri, run_id = record["tracking_uri"], record["run_id"]
    prefix = re.sub(r"[^a-zA-Z0-9_.-]+", "_", out.name) or "eval"
    try:
        problem = probe_store(uri, quick=True)
        if problem:
            raise ConnectionError(problem)
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.get_run(run_id)
        for file in sorted(out.iterdir()):
            if file.suffix == ".png" or file.name in (rundir.METRICS, "classification_report.txt",
                                                      "confusion_matrix.csv"):
                client.log_artifact(run_id, str(file), prefix)
        now = int(time.time() * 1000)
        numbers = [Metric(f"{prefix}/{k}", float(v), now, 0) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        client.log_batch(run_id, metrics=numbers)
        log.info("Evaluation logged to MLflow run %s (%s), under %s/", run_id, uri, prefix)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("The evaluation could not be logged to MLflow run %s in %s (%s); it is in %s", run_id, uri,
                    text[:300], out)


def hints(s: DictConfig, folder: Path, sweep: bool = False) -> list[str]:
    """How to look at what the switched-on loggers wrote for the run (or sweep) in `folder`."""
    lines = []
    if s.tensorboard:
        lines.append(f"TensorBoard: uv run tensorboard --logdir {folder}")
    if s.mlflow:
        uri = resolve_tracking_uri(s.tracking_uri)
        if uri.startswith(("file:", "sqlite:")):
            allow = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") else ""
            lines.append(f"MLflow: {allow}uv run mlflow ui --backend-store-uri {uri} (experiment {s.experiment})")
        else:
            lines.append(f"MLflow: {uri} (experiment {s.experiment})")
    if s.wandb and (s.offline if s.offline is not None else _offline_by_default()):
        lines.append(f"W&B (offline): uv run wandb sync {folder}{'/*' if sweep else ''}/wandb/offline-run-*")
    return lines


def resolve_tracking_uri(uri: str | None) -> str:
    """logger.tracking_uri as an absolute URI: null is $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db (one
    store for every run started in this folder, so a sweep's runs sit side by side); relative local paths are made
    absolute; a bare path is refused (a folder and a database file need different URIs)."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}").strip()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        return f"sqlite:///{path if path.is_absolute() else Path.cwd() / path}"
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        path = Path(parsed.path if parsed.netloc in ("", "localhost") else uri[len("file:"):]).expanduser()
        return (path if path.is_absolute() else Path.cwd() / path).as_uri()
    if uri != "databricks" and not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", uri):
        raise ConfigError(f"logger.tracking_uri={uri} is a path, not a URI: sqlite:///{uri}/mlflow.db (a "
                          f"database file), {Path(uri).expanduser().resolve().as_uri()} (a folder of files, MLflow's "
                          "old store) or http://HOST:PORT (a server)")
    return uri


def probe_store(uri: str, quick: bool = False) -> str | None:
    """Why MLflow cannot use the store at `uri`, in a few words, or None: a server is asked for /health (5 s at
    most), a local store is opened (its folder made; a new SQLite file gets MLflow's tables)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # a server answered: a proxy or auth in front of /health is for the client to meet below
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return f"no MLflow server answers there ({reason}): start one (uv run mlflow server --port 5000) or " \
                   "choose another logger.tracking_uri (default: a local SQLite store)"
        if quick:
            return None
    if scheme == "sqlite":
        try:
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot make its folder ({e.strerror or e})"
    elif scheme == "file":
        _allow_file_store(uri)
        try:
            Path(urlparse(uri).path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot make the folder ({e.strerror or e})"
    creating = _one_creator(Path(uri[len("sqlite:///"):])) if scheme == "sqlite" else contextlib.nullcontext()
    try:
        with creating, _without_http_retries():
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"MLflow cannot use this store ({text[:300]})"
    return None


@contextlib.contextmanager
def _one_creator(database: Path, timeout: float = 120.0):
    """One process at a time opens a SQLite store that may be new: opening one creates MLflow's tables (its
    migrations), and two runs started at once into a fresh folder made the second fail half-way through them
    ("Online migration expected to match one row"). An exclusive lock on .DATABASE.lock beside it; the second
    waits, then finds the tables made."""
    import fcntl

    from finetune.locks import flocked

    path, started = database.with_name(f".{database.name}.lock"), time.monotonic()
    while (fd := flocked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)) is None:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"another process has held {database} for {timeout:.0f} s")
        time.sleep(0.1)
    try:
        yield
    finally:
        os.close(fd)


def wandb_logged_in() -> bool:
    """Whether W&B has a key here: WANDB_API_KEY, or the netrc entry `wandb login` writes for its server (in $NETRC
    where that is set, as wandb reads it, else ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    files = [os.environ["NETRC"]] if os.environ.get("NETRC") else [Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in files:
        if Path(path).is_file():
            try:
                entry = netrc.netrc(str(path)).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                continue
            if entry and entry[2]:
                return True
    return False


def _offline_by_default() -> bool:
    """logger.offline=null: offline where WANDB_MODE says so or where W&B has no login."""
    return os.environ.get("WANDB_MODE", "") in ("offline", "dryrun") or not wandb_logged_in()


def read_record(run_dir: Path) -> dict:
    return _read_json(run_dir / RECORD)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _connects(host: str, port: int) -> str | None:
    import socket

    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return str(e.strerror or e)
    return None


def _allow_file_store(uri: str) -> None:
    """MLflow 3 keeps its file store only for those who ask: a file: URI given on purpose is that asking."""
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


def _make_experiment(uri: str, name: str) -> None:
    """The experiment, made if new, with its artifacts beside a SQLite file (outputs/mlartifacts/EXPERIMENT):
    MLflow's default is ./mlruns in whatever folder the command runs in. Other stores choose their own."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"logger.experiment={name} is a deleted experiment in {uri}: restore it "
                          f"(uv run mlflow experiments restore) or choose another logger.experiment")
    if experiment is None:
        folder = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", name)
        location = folder.as_uri() if uri.startswith("sqlite:") else None
        client.create_experiment(name, artifact_location=location)


def _mlflow_run_exists(uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


@contextlib.contextmanager
def _without_http_retries() -> Iterator[None]:
    """MLflow's client retries an HTTP request for minutes by default; a probe wants one short answer."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(PROBE_TIMEOUT_S * 2)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
