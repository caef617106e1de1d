"""The house's layout: no import cycle, errors that import nothing, and a front half that decides a command before
torch, Lightning, torchvision or timm load, so that a command that cannot run says so in seconds."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

PACKAGE = ROOT / "src" / "finetune"
HEAVY = ("torch", "torchvision", "lightning", "timm")
# What decides a command before the back half: errors, the schema, presets, checks, which run, the run's file names,
# the script boundary; and what the checks read of the owners of each list of choices.
FRONT = ("errors", "config", "presets", "rundir", "checks", "runconfig", "cli", "cluster", "schedule", "loggers",
         "data", "data.readers", "data.duplicates", "data.transforms", "models.heads", "predict", "exported", "tasks")
TASK_NAMES = ("multiclass", "multilabel", "regression")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            if node.module in known and not any(f"{node.module}.{a.name}" in known for a in node.names):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v] - {v}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle_even_through_imports_inside_functions():
    known = modules()
    graph = {name: imports_of(path, known) for name, path in known.items()}
    assert graph["finetune.training"] >= {"finetune.runconfig", "finetune.trainer"}  # the walk sees the imports
    assert cycles(graph) == []
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(cyclic) == [["a", "b", "c"]]  # and the check finds one


def places_naming_a_task(source: str) -> list[int]:
    """The lines of `source` that name a task outside a docstring: a string "multiclass", "multilabel" or
    "regression" (compared, a dict key, an argument), or the task objects MULTICLASS, MULTILABEL, REGRESSION."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in TASK_NAMES and id(node) not in docstrings
                  or isinstance(node, ast.Name) and node.id in {name.upper() for name in TASK_NAMES})


def test_outside_the_task_package_only_the_readers_name_a_task_at_most_a_dozen_times():
    assert places_naming_a_task('"""regression"""\nif task.name == "multilabel" or task is REGRESSION:\n    pass') == \
        [2, 2]  # the count sees a comparison with a name and with a task object, and not a docstring
    found = {str(path.relative_to(PACKAGE)): lines for path in PACKAGE.rglob("*.py")
             if "tasks" not in path.relative_to(PACKAGE).parts for lines in [places_naming_a_task(path.read_text())]
             if lines}
    assert sum(map(len, found.values())) <= 12, found
    assert all(path.startswith("data/") for path in found), found  # the readers, inferring a task from the data


def test_errors_import_nothing_of_the_package():
    known = modules()
    assert imports_of(known["finetune.errors"], known) == set()


def test_the_front_half_loads_no_torch_lightning_torchvision_or_timm():
    names = ", ".join(f"finetune.{m}" for m in FRONT)
    code = f"import sys, {names}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def heavy_imports(stderr: str) -> list[str]:
    """The heavy packages that `python -X importtime` says the process imported."""
    loaded = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return sorted(m for m in HEAVY if m in loaded)


@pytest.mark.parametrize(("args", "message"), [
    (["schedule.lr=0"], "schedule.lr must be > 0 (got 0.0)"),
    (["schedule.bn=fixed"], "schedule.bn must be one of frozen, train (got fixed)"),
    (["dataset=image_folder", "dataset.root=/no/such/dir"], "dataset.root=/no/such/dir: no such directory"),
    (["dataset=dogs_vs_cats"], "dataset.root is required for dataset=dogs_vs_cats"),
    (["dataset.name=imagefolder"], "dataset.name=imagefolder has no reader"),
    (["augment.crop=random"], "augment.crop must be one of random_resized, center (got random)"),
    (["logger.log_model=true"], "logger.log_model=true uploads best.ckpt to MLflow or W&B"),
    (["head.name=conv"], "head.name must be one of linear, mlp (got conv)"),
    (["schedule.lrr=1e-3"], "schedule.lrr"),
])
def test_a_command_that_cannot_run_is_one_line_before_torch_loads(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scripts" / "train.py"), *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode in (1, 2), result.stderr[-2000:]
    assert any(message in line for line in errors + result.stdout.splitlines()), "\n".join(errors)[-2000:]
    assert "Traceback" not in result.stderr
    assert heavy_imports(result.stderr) == []


def test_resuming_a_finished_run_is_refused_before_torch_loads(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not read")
    (run_dir / "metrics.json").write_text('{"epochs": 3}\n')
    (run_dir / "config.yaml").write_text("seed: 42\nschedule:\n  epochs: 3\n")
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scripts" / "train.py"),
                             f"resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"resume={run_dir}: that run has finished its 3 epochs (metrics.json)" in result.stderr + result.stdout
    assert heavy_imports(result.stderr) == []
    assert (run_dir / "config.yaml").read_text() == "seed: 42\nschedule:\n  epochs: 3\n"  # nothing rewritten
    assert not list(run_dir.glob("config.before-resume-*"))


@pytest.mark.parametrize(("hidden", "args", "message"), [
    ("mlflow", ["logger=mlflow"], "logger=mlflow needs the optional extra 'mlflow' (mlflow is not installed): "
                                  "uv sync --extra mlflow"),
    ("wandb", ["logger=wandb"], "logger=wandb needs the optional extra 'wandb'"),
    ("hydra_plugins.hydra_submitit_launcher", ["-m", "hydra/launcher=slurm"],
     "hydra/launcher=slurm needs the optional extra 'slurm' (hydra_plugins.hydra_submitit_launcher is not "
     "installed): uv sync --extra slurm"),
    ("hydra_plugins.hydra_optuna_sweeper", ["hparams_search=lr_optuna"], "uv sync --extra optuna"),
])
def test_an_integration_whose_extra_is_missing_is_one_line_naming_the_install_command(
        tmp_path, monkeypatch, hidden, args, message):
    from support import run_script

    monkeypatch.setitem(sys.modules, hidden, None)  # as if not installed: importlib finds no such module
    result = run_script("train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_onnx_export_or_prediction_without_the_onnx_extra_names_the_install_command(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from finetune.errors import MissingExtra
    from finetune.export import check
    from finetune.exported import ExportedModel

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra, match=r"format=onnx needs the optional extra 'onnx' \(onnxruntime is not "
                                           r"installed\): uv sync --extra onnx"):
        check(OmegaConf.create({"format": "onnx", "quantize": "none", "max_accuracy_drop": 1.0}))
    with pytest.raises(MissingExtra, match="uv sync --extra onnx"):
        ExportedModel(tmp_path / "model.onnx")


def test_the_datasets_table_of_the_docs_is_the_readers_table():
    from finetune.data.readers import READERS

    lines = (ROOT / "docs" / "datasets.md").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| `dataset=` |"))) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| `"):
            break
        rows[line[3:line.index("`", 3)].split(" ")[0]] = line
    assert sorted(rows) == sorted(READERS)  # every reader has its row, and every row its reader
    for name, reader in READERS.items():
        for key in reader.own_keys:
            assert f"dataset.{key}" in rows[name], (name, key)
        for target in reader.targets:
            assert target in rows[name], (name, target)
        if len(reader.tasks) > 1:
            assert "tasks.md" in rows[name], name  # where reading labels of every task is explained
