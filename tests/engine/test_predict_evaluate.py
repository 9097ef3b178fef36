"""Prediction (PNG pairs, folders, NIfTI geometry round trip) and evaluation outputs."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vmambax.data.dataset import DataError
from vmambax.engine import checkpoint as ck
from vmambax.engine.evaluate import evaluate, table_line
from vmambax.engine.predict import predict
from vmambax.utils.tiny import TinySegNet


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "tiny.pt")
    ck.save_atomic({"format": ck.FORMAT, "version": ck.VERSION, "model_spec": {"name": "tiny", "kwargs": {}},
                    "model": TinySegNet().state_dict()}, path)
    return path


def test_nifti_roundtrip_keeps_geometry(tiny_ckpt, tmp_path):
    # Odd in-plane size (not a multiple of 32), anisotropic and oblique affine, a header field set.
    rng = np.random.default_rng(0)
    aff = np.array([[0.7, 0.1, 0, -120.0], [0, 1.3, 0.05, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    ct = nib.Nifti1Image(rng.uniform(-1000, 200, (50, 70, 3)).astype(np.int16), aff)
    ct.header.set_xyzt_units("mm", "sec")
    pet = nib.Nifti1Image(rng.uniform(0, 12, (50, 70, 3)).astype(np.float32), aff)
    nib.save(ct, tmp_path / "case_CT.nii.gz")
    nib.save(pet, tmp_path / "case_PET.nii.gz")
    written = predict(tiny_ckpt, str(tmp_path / "case_CT.nii.gz"), str(tmp_path / "case_PET.nii.gz"),
                      str(tmp_path / "out"))
    out = nib.load(written[0])
    assert os.path.basename(written[0]) == "case_mask.nii.gz"
    assert out.shape == (50, 70, 3) and np.allclose(out.affine, aff)
    assert out.header.get_xyzt_units() == ("mm", "sec") and out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}


def test_nifti_slices_map_back_to_the_same_voxels(tiny_ckpt, tiny_data, tmp_path):
    # The synthetic volumes store PNG slice z as [:, :, z].T: prediction from the NIfTI must match
    # prediction from the PNG of that slice, voxel for voxel.
    nd = os.path.join(tiny_data, "nifti")
    w = predict(tiny_ckpt, os.path.join(nd, "P0001_CT.nii.gz"), os.path.join(nd, "P0001_PET.nii.gz"),
                str(tmp_path / "n"))
    vol = np.asarray(nib.load(w[0]).dataobj)
    w2 = predict(tiny_ckpt, os.path.join(tiny_data, "P0001", "P0001_002_CT.png"),
                 os.path.join(tiny_data, "P0001", "P0001_002_PET.png"), str(tmp_path / "p"))
    png = np.array(Image.open(w2[0])) > 0
    assert png.any() and np.array_equal(vol[:, :, 2].T.astype(bool), png)


def test_png_folder_pairs_and_errors(tiny_ckpt, tiny_data, tmp_path):
    w = predict(tiny_ckpt, os.path.join(tiny_data, "P0000"), os.path.join(tiny_data, "P0000"), str(tmp_path / "o"))
    assert sorted(os.path.basename(p) for p in w)[:2] == ["P0000_000_mask.png", "P0000_000_overlay.png"]
    assert len(w) == 8 and Image.open(w[1]).mode == "RGB"
    small = tmp_path / "small_PET.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small)
    ct = os.path.join(tiny_data, "P0000", "P0000_000_CT.png")
    with pytest.raises(DataError, match="ct and pet: .*P0000_000_CT.png is 64x64 but .*small_PET.png is 32x32"):
        predict(tiny_ckpt, ct, str(small), str(tmp_path / "o2"))
    with pytest.raises(FileNotFoundError, match="pet: .*nope.png does not exist"):
        predict(tiny_ckpt, ct, str(tmp_path / "nope.png"), str(tmp_path / "o3"))
    with pytest.raises(ValueError, match="two PNG files, two folders or two NIfTI"):
        predict(tiny_ckpt, ct, os.path.join(tiny_data, "nifti", "P0000_PET.nii.gz"), str(tmp_path / "o4"))


def test_evaluate_writes_summary_figure_and_counts_empty_masks(tiny_ckpt, tiny_data, tmp_path):
    s = evaluate(tiny_data, tiny_ckpt, str(tmp_path / "ev"), split="test", n_figure=2)
    saved = json.load(open(tmp_path / "ev" / "summary.json"))
    assert saved["n_slices"] == 4 and len(saved["cases"]) == 4 and saved["units"]["hd95"] == "mm"
    assert sum(saved["empty_counts"].values()) == 4 and "both masks empty" in saved["empty_policy"]
    for k in ("dice_per_slice", "iou_per_slice", "dice_pooled", "iou_pooled", "hd95_per_slice"):
        assert k in saved["mean"]
    assert os.path.getsize(tmp_path / "ev" / "qualitative.png") > 0
    assert saved["model"]["params"] == sum(p.numel() for p in TinySegNet().parameters())
    line = table_line("tiny", s)
    assert "Params 0.00 M" not in line and "pooled" in line and "mm" in line
    s2 = evaluate(tiny_data, tiny_ckpt, str(tmp_path / "ev2"), spacing=None, n_figure=0)
    assert s2["mean"]["hd95_per_slice"] == pytest.approx(s["mean"]["hd95_per_slice"])
    os.rename(os.path.join(tiny_data, "dataset.json"), os.path.join(tiny_data, "dataset.bak"))
    try:
        s3 = evaluate(tiny_data, tiny_ckpt, str(tmp_path / "ev3"), n_figure=0)
    finally:
        os.rename(os.path.join(tiny_data, "dataset.bak"), os.path.join(tiny_data, "dataset.json"))
    assert s3["units"]["hd95"] == "pixels"
    assert s3["mean"]["hd95_per_slice"] == pytest.approx(s["mean"]["hd95_per_slice"] / (0.98 * 8))
