"""The `vmambax` command end to end: synth -> train -> resume -> evaluate -> predict, info, errors."""
import json
import os
import subprocess
import sys

import pytest

import vmambax.utils.tiny  # noqa: F401  registers the "tiny" test model
from vmambax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_synth_train_resume_evaluate_predict(tmp_path, capsys):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["synth", "--out", data, "--patients", "4", "--size", "64", "--slices", "3", "--nifti"]) == 0
    assert "4 patients x 3 slices" in capsys.readouterr().out
    train = ["train", "--data", data, "--out", run, "--batch-size", "2", "--size", "64", "--steps-per-epoch", "2",
             "--workers", "0", "--no-progress", "--model", "tiny", "--lr", "1e-3", "--deterministic"]
    assert main(train + ["--epochs", "1"]) == 0
    assert "trained to epoch 1" in capsys.readouterr().out
    assert main(["train", "--data", data, "--out", run, "--resume", "--epochs", "1", "--no-progress",
                 "--workers", "0"]) == 0  # a finished run resumed does nothing more
    assert main(train + ["--epochs", "1"]) == 2  # the folder holds a run: refused, nothing lost
    assert "already holds a run" in capsys.readouterr().err
    ck = os.path.join(run, "checkpoint_best.pt")
    assert main(["evaluate", "--data", data, "--checkpoint", ck, "--out", str(tmp_path / "ev"),
                 "--figure-cases", "1"]) == 0
    out = capsys.readouterr().out
    assert "per-slice mean" in out and "pooled" in out and "empty masks:" in out and "HD95" in out and " mm" in out
    assert json.load(open(tmp_path / "ev" / "summary.json"))["split"] == "test"
    assert main(["evaluate", "--data", data, "--checkpoint", ck, "--out", str(tmp_path / "ev2"),
                 "--spacing", "0.5,2", "--figure-cases", "0", "--policy", "published", "--no-cuda-graphs"]) == 0
    ev2 = json.load(open(tmp_path / "ev2" / "summary.json"))
    assert ev2["spacing"] == [0.5, 2.0] and ev2["cuda_graphs"] is False and ev2["compiled"] is False
    nd = os.path.join(data, "nifti")
    assert main(["predict", "--checkpoint", ck, "--ct", os.path.join(nd, "P0000_CT.nii.gz"),
                 "--pet", os.path.join(nd, "P0000_PET.nii.gz"), "--out", str(tmp_path / "pred"),
                 "--no-cuda-graphs"]) == 0
    assert os.path.exists(tmp_path / "pred" / "P0000_mask.nii.gz")


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt"),
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmambax evaluate: error:") and "test.txt does not exist" in err
    (tmp_path / "x.pt").write_text("not a checkpoint")
    open(tmp_path / "test.txt", "w").close()
    assert main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt"),
                 "--out", str(tmp_path / "e")]) == 2
    assert "test.txt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", "d", "--checkpoint", "c", "--spacing", "abc"])
    assert "expected a pixel size" in capsys.readouterr().err


def test_info_through_python_m():
    r = subprocess.run([sys.executable, "-m", "vmambax", "info"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "selective_scan_2d backends:" in r.stdout and "reference  yes" in r.stdout and "torch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vmambax", "train", "--data", "/nonexistent-data", "--out", "x"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "data: the dataset folder /nonexistent-data does not exist" in r.stderr


def test_demo_code_path_at_toy_size(tmp_path, capsys):
    out = str(tmp_path / "demo")
    args = ["demo", "--out", out, "--patients", "3", "--slices", "2", "--size", "64", "--epochs", "1",
            "--batch-size", "2", "--no-progress", "--model", "tiny"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "vmambax demo finished" in text and "Params" in text and "empty masks:" in text
    for f in ("run/checkpoint_best.pt", "run/training_curve.png", "eval/summary.json", "eval/qualitative.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert main(args) == 0  # a demo folder is replaced by the next demo
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert main(args[:2] + [str(keep)] + args[3:]) == 2
    assert (keep / "notes.txt").read_text() == "precious"


def test_model_args_reach_the_checkpoint_and_evaluation(tmp_path, capsys):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["synth", "--out", data, "--patients", "3", "--size", "64", "--slices", "2"]) == 0
    assert main(["train", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "2", "--size", "64",
                 "--workers", "0", "--no-progress", "--model", "tiny", "--model-arg", "width=4"]) == 0
    from vmambax.engine.checkpoint import load
    assert load(os.path.join(run, "checkpoint_final.pt"))["model_spec"] == {"name": "tiny", "kwargs": {"width": 4}}
    assert main(["evaluate", "--data", data, "--checkpoint", os.path.join(run, "checkpoint_final.pt"),
                 "--out", str(tmp_path / "ev"), "--figure-cases", "0"]) == 0
    assert main(["train", "--data", data, "--out", str(tmp_path / "r2"), "--model", "tiny",
                 "--model-arg", "nonsense=1", "--workers", "0", "--batch-size", "2", "--size", "64"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_evaluate_and_predict_take_compile():
    from vmambax.cli import _parser
    p = _parser()
    assert p.parse_args(["evaluate", "--data", "d", "--checkpoint", "c", "--compile"]).compile is True
    assert p.parse_args(["predict", "--checkpoint", "c", "--ct", "a", "--pet", "b", "--out", "o"]).compile is False
