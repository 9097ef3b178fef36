"""The demo's code path with the full default VMambaX at toy size (32x32), through the CLI."""
import json
import os

import nibabel as nib
import pytest

pytest.importorskip("vmambax.models")
from vmambax.cli import main  # noqa: E402


@pytest.mark.slow
def test_full_model_train_evaluate_predict_at_toy_size(tmp_path, capsys):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["synth", "--out", data, "--patients", "3", "--size", "32", "--slices", "2", "--nifti"]) == 0
    assert main(["train", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "2", "--size", "32",
                 "--lr", "3e-4", "--workers", "0", "--no-progress", "--deterministic"]) == 0
    log = open(os.path.join(run, "train.log")).read()
    assert "53.40 M parameters" in log and "epoch 1/1" in log  # the paper's model, not a shrunk one
    ck = os.path.join(run, "checkpoint_final.pt")
    assert main(["evaluate", "--data", data, "--checkpoint", ck, "--out", str(tmp_path / "ev"),
                 "--figure-cases", "2"]) == 0
    s = json.load(open(tmp_path / "ev" / "summary.json"))
    assert s["model"]["params"] == 53_403_682 and s["model"]["flops_g"] > 0 and s["n_slices"] == 2
    assert "Params 53.40 M" in capsys.readouterr().out
    nd = os.path.join(data, "nifti")
    test_patient = open(os.path.join(data, "test.txt")).read().split("_")[0]
    assert main(["predict", "--checkpoint", ck, "--ct", os.path.join(nd, f"{test_patient}_CT.nii.gz"),
                 "--pet", os.path.join(nd, f"{test_patient}_PET.nii.gz"), "--out", str(tmp_path / "pr")]) == 0
    assert nib.load(tmp_path / "pr" / f"{test_patient}_mask.nii.gz").shape == (32, 32, 2)
