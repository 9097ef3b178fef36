"""Synthetic data (layout, determinism, both modalities needed) and dataset checks (clear errors)."""
import os

import numpy as np
import pytest
from PIL import Image

from vmambax.data import (DataError, SliceDataset, augment, derive_val, make_synthetic_dataset, patient_of,
                          read_spacing, read_split)
from vmambax.data.transforms import sample_generator


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    desc = make_synthetic_dataset(root, patients=4, size=64, slices=4, seed=3)
    return root, desc


def test_layout_and_splits_are_per_patient(synth):
    root, desc = synth
    splits = {s: read_split(root, s) for s in ("train", "val", "test")}
    assert desc["splits"] == {"train": 2, "val": 1, "test": 1}
    pats = {s: {patient_of(i) for i in ids} for s, ids in splits.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    sid = splits["train"][0]
    for m in ("CT", "PET", "mask"):
        im = Image.open(os.path.join(root, patient_of(sid), f"{sid}_{m}.png"))
        assert im.mode == "L" and im.size == (64, 64)
    assert read_spacing(root) == pytest.approx((0.98 * 8, 0.98 * 8))


def test_deterministic_by_seed(synth, tmp_path):
    root, _ = synth
    make_synthetic_dataset(str(tmp_path / "a"), patients=4, size=64, slices=4, seed=3)
    make_synthetic_dataset(str(tmp_path / "b"), patients=4, size=64, slices=4, seed=4)
    f = os.path.join("P0001", "P0001_002_PET.png")
    same = np.array(Image.open(os.path.join(root, f)))
    assert np.array_equal(same, np.array(Image.open(tmp_path / "a" / f)))
    assert not np.array_equal(same, np.array(Image.open(tmp_path / "b" / f)))


def test_tumors_are_hot_on_pet_and_dense_on_ct_and_decoys_exist(tmp_path):
    make_synthetic_dataset(str(tmp_path), patients=6, size=96, slices=6, seed=0)
    ds = SliceDataset(str(tmp_path), [f"P{p:04d}_{z:03d}" for p in range(6) for z in range(6)])
    tumor_pet, hot_outside, dense_outside = [], 0, 0
    for i in range(len(ds)):
        it = ds[i]
        m = it["mask"][0].numpy() > 0
        pet, ct = it["pet"][0].numpy(), it["ct"][0].numpy()
        if m.any():
            tumor_pet.append(pet[m].mean())
        # Bright PET outside the tumor (heart, hot spots) and dense CT outside it (vessels, nodules,
        # mediastinum) mean neither modality alone gives the mask.
        hot_outside += int(((pet > 0.0) & ~m).sum() > 10)
        dense_outside += int(((ct > 1.0) & ~m).sum() > 10)
    assert len(tumor_pet) > 0.6 * len(ds)
    assert np.mean(tumor_pet) > -0.2  # SUV > ~3.75 on average inside tumors: well above background
    assert hot_outside > 0.3 * len(ds) and dense_outside == len(ds)


def test_scaling_and_binarised_mask(synth):
    root, _ = synth
    it = SliceDataset(root, read_split(root, "train"))[0]
    assert it["ct"].shape == (1, 64, 64) and it["ct"].min() >= -1.6 and it["ct"].max() <= 1.6
    assert set(it["mask"].unique().tolist()) <= {0.0, 1.0}


def test_augment_is_deterministic_per_seed_epoch_index(synth):
    root, _ = synth
    it = SliceDataset(root, read_split(root, "train"))[1]
    a = augment(it, (32, 32), sample_generator(0, 2, 1))
    b = augment(it, (32, 32), sample_generator(0, 2, 1))
    c = augment(it, (32, 32), sample_generator(0, 3, 1))
    assert a["ct"].shape == (1, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert all(a[k].equal(b[k]) for k in ("ct", "pet", "mask")) and not a["ct"].equal(c["ct"])
    big = augment(it, (96, 96), sample_generator(0, 0, 0))  # crop larger than the image: padded
    assert big["ct"].shape == (1, 96, 96) and float(big["ct"].min()) == pytest.approx(-1.6)


def test_derive_val_is_per_patient_and_needs_two_patients():
    ids = [f"P{p}_{z}" for p in range(10) for z in range(3)]
    tr, va = derive_val(ids, 0.2, seed=1)
    assert len({patient_of(i) for i in va}) == 2 and not {patient_of(i) for i in tr} & {patient_of(i) for i in va}
    with pytest.raises(DataError, match="cannot derive a validation split from 1 training patient"):
        derive_val(["A_1", "A_2"])


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_corrupt_mismatched_and_empty_split_name_the_file(synth, tmp_path):
    root = _copy(synth[0], tmp_path / "d")
    ids = read_split(root, "train")
    ct0 = os.path.join(root, patient_of(ids[0]), f"{ids[0]}_CT.png")
    pet1 = os.path.join(root, patient_of(ids[1]), f"{ids[1]}_PET.png")
    mask2 = os.path.join(root, patient_of(ids[2]), f"{ids[2]}_mask.png")
    os.remove(ct0)
    with open(pet1, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(mask2)
    with pytest.raises(DataError, match=f"image {ct0} does not exist"):
        SliceDataset(root, ids)
    with pytest.raises(DataError, match=f"image {pet1} cannot be read"):
        SliceDataset(root, ids[1:])
    with pytest.raises(DataError, match=f"slice {ids[2]} .* one size, got CT 64x64, PET 64x64, mask 32x64"):
        SliceDataset(root, ids[2:])
    ds = SliceDataset(root, ids, skip_bad=True)
    assert len(ds) == len(ids) - 3 and [s for s, _ in ds.skipped] == ids[:3]
    open(os.path.join(root, "val.txt"), "w").write("\n\n")
    with pytest.raises(DataError, match="split file .*val.txt is empty"):
        read_split(root, "val")
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_split(root, "nope")
