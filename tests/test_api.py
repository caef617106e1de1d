"""finetune from Python (finetune.compose, train, load, Model.predict/evaluate/export) and the installed `finetune`
command: the same configs, checks and results as the scripts."""

import subprocess
import sys

import numpy as np
from PIL import Image
from support import ROOT, read_csv, run_finetune, run_script

import finetune


def test_import_finetune_is_light_and_a_bad_override_is_one_line_before_torch_loads():
    code = ("import sys, finetune\n"
            "try:\n"
            "    finetune.train('dataset=imagefolder')\n"
            "except finetune.errors.ConfigError as e:\n"
            "    print('refused:', e)\n"
            "try:\n"
            "    finetune.compose('schedule.lr=fast')\n"
            "except finetune.errors.ConfigError as e:\n"
            "    print('refused:', e)\n"
            "print(sorted(m for m in ('torch', 'lightning', 'timm', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr[-2000:]
    assert lines[0].startswith("refused: dataset=imagefolder: there is no such dataset preset") and \
        "image_folder" in lines[0]
    assert lines[1].startswith("refused:") and "schedule.lr" in lines[1]
    assert lines[2] == "[]"  # neither refusal loaded torch, Lightning, timm or torchvision


def test_compose_gives_the_command_lines_config_and_a_run_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = finetune.compose("dataset=image_folder", f"dataset.root={tmp_path}", "schedule.lr=3e-4", "head=mlp")
    assert cfg.schedule.lr == 3e-4 and cfg.head.name == "mlp" and cfg.dataset.name == "image_folder"
    assert cfg.schedule.freeze_epochs == 2 and cfg.schedule.bn == "frozen"  # the schema's defaults, stated once
    run_dir = tmp_path / "outputs" / "runs"
    assert str(cfg.run_dir).startswith(str(run_dir)) and "hydra" not in cfg
    assert finetune.compose("run_dir=/somewhere/else").run_dir == "/somewhere/else"
    tool = finetune.compose("ckpt=x.ckpt", "split=val", config="evaluate")
    assert tool.split == "val" and tool.ckpt == "x.ckpt"


def test_load_predicts_what_predict_writes_from_files_folders_pil_images_and_arrays(tmp_path, colours_run, shapes):
    run = colours_run(tmp_path)
    model = finetune.load(run.run_dir)
    assert model.kind == "checkpoint" and model.task.name == "multiclass" and len(model.classes) == 3
    files = sorted(str(p) for p in (shapes / "red").glob("*.jpg"))[:4] + \
        sorted(str(p) for p in (shapes / "green").glob("*.jpg"))[:4]
    written = run_script("predict", f"ckpt={run.run_dir}", f"inputs={shapes}", "out=p.csv", "top_k=3", cwd=tmp_path)
    assert written.returncode == 0, written.output[-2000:]
    top = {row["path"]: row["class"] for row in read_csv(tmp_path / "p.csv") if row["rank"] == "1"}

    from_folder = model.predict(str(shapes), top_k=3)
    assert {p.input: p.label for p in from_folder} == top  # every image of the folder, as predict.py decided it
    assert all(len(p.top) == 3 and abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in from_folder)
    images = [Image.open(f) for f in files]
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    from_files, from_pil, from_arrays = model.predict(files), model.predict(images), model.predict(arrays)
    assert [p.label for p in from_files] == [top[f] for f in files]
    for other in (from_pil, from_arrays):  # decoded by the caller or by finetune: the same pixels, the same outputs
        assert [p.label for p in other] == [p.label for p in from_files]
        assert all(abs(a.probabilities[c] - b.probabilities[c]) < 1e-5
                   for a, b in zip(other, from_files) for c in model.classes)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    mixed = model.predict([files[0], str(broken), arrays[1]])
    assert mixed[0].label == from_files[0].label and mixed[2].label == from_files[1].label
    assert mixed[1].label is None and mixed[1].error  # named, and the others still predicted


def test_the_finetune_command_is_the_scripts_entry_point(tmp_path, colours_run, shapes):
    run = colours_run(tmp_path)
    by_command = run_finetune("predict", f"ckpt={run.run_dir}", f"inputs={shapes / 'red'}", "out=c.csv", cwd=tmp_path)
    by_script = run_script("predict", f"ckpt={run.run_dir}", f"inputs={shapes / 'red'}", "out=s.csv", cwd=tmp_path)
    assert by_command.returncode == by_script.returncode == 0, by_command.output[-2000:]
    assert (tmp_path / "c.csv").read_text() == (tmp_path / "s.csv").read_text()
    wrong = run_finetune("predict", f"ckpt={run.run_dir}", "inputs=/no/such/folder", cwd=tmp_path)
    assert wrong.returncode == 2 and "inputs=/no/such/folder: no such file or folder" in wrong.output
    unknown = run_finetune("trian", cwd=tmp_path)
    assert unknown.returncode == 2 and "there is no such command" in unknown.output and "train" in unknown.output
    usage = subprocess.run([sys.executable, "-c", "from finetune.commands import main; main()", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert usage.returncode == 0 and all(c in usage.stdout for c in ("train", "evaluate", "predict", "export"))
