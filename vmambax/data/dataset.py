"""PCLT20K-layout slices (SPEC.md section 4): split files, file checks, loading and scaling.

``ROOT/<patient>/<id>_{CT,PET,mask}.png`` with ``id = <patient>_<slice>``; split files list ids.
Images are scaled ``v / 255 * 3.2 - 1.6``; masks binarised at 0.5.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

MODALITIES = ("CT", "PET", "mask")


class DataError(ValueError):
    """Bad input data; the message names the file."""


def scale_image(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float32) / 255.0 * 3.2 - 1.6


def patient_of(slice_id: str) -> str:
    return slice_id.split("_", 1)[0]


def slice_paths(root: str, slice_id: str) -> dict[str, str]:
    return {m: os.path.join(root, patient_of(slice_id), f"{slice_id}_{m}.png") for m in MODALITIES}


def read_split(root: str, split: str) -> list[str]:
    """Ids listed in ``root/<split>.txt`` (blank lines ignored). Raises if missing or empty."""
    path = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} does not exist (expected one id <patient>_<slice> per line)")
    with open(path) as f:
        ids = [ln.strip() for ln in f if ln.strip()]
    if not ids:
        raise DataError(f"split file {path} is empty: expected at least one id <patient>_<slice>")
    return ids


def has_split(root: str, split: str) -> bool:
    return os.path.isfile(os.path.join(root, f"{split}.txt"))


def read_spacing(root: str) -> tuple[float, float] | None:
    """(row, column) pixel size in mm from ``root/dataset.json`` (key ``spacing``), if present."""
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            sp = json.load(f).get("spacing")
        return (float(sp[0]), float(sp[1])) if sp is not None else None
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: expected a JSON object with 'spacing': [row_mm, col_mm], got an error: {exc}")


def load_gray(path: str, full: bool = True) -> np.ndarray | tuple[int, int]:
    """An 8-bit grayscale image as (H, W) uint8 (or only its (H, W) when not ``full``)."""
    if not os.path.isfile(path):
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            if not full:
                return im.size[1], im.size[0]
            return np.asarray(im.convert("L"))
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncated/corrupt files so
        raise DataError(f"image {path} cannot be read (corrupt or not an image): {exc}") from None


def check_slice(root: str, slice_id: str, full: bool = False) -> tuple[int, int]:
    """Checks the three files of a slice exist (and decode, when ``full``) with one size."""
    sizes = {m: load_gray(p, full) for m, p in slice_paths(root, slice_id).items()}
    sizes = {m: (s.shape if full else s) for m, s in sizes.items()}
    if len(set(sizes.values())) != 1:
        detail = ", ".join(f"{m} {h}x{w}" for m, (h, w) in sizes.items())
        raise DataError(f"slice {slice_id} in {root}: CT, PET and mask must have one size, got {detail}")
    return sizes["CT"]


class SliceDataset(torch.utils.data.Dataset):
    """Slices of one split. Items: dict ``ct``, ``pet`` (1, H, W) float32 scaled, ``mask`` (1, H, W)
    float32 in {0, 1}, ``id``.

    Every slice is checked at construction (files exist, headers readable, sizes agree); with
    ``skip_bad`` each is fully decoded and bad slices are dropped and listed in ``skipped``
    instead of raising.
    """

    def __init__(self, root: str, ids: list[str], skip_bad: bool = False):
        self.root, self.skipped, good, sizes = root, [], [], set()
        for sid in ids:
            try:
                sizes.add(check_slice(root, sid, full=skip_bad))
                good.append(sid)
            except DataError as exc:
                if not skip_bad:
                    raise DataError(f"{exc} (pass --skip-bad to skip bad slices)") from None
                self.skipped.append((sid, str(exc)))
                log.warning("skipping %s", exc)
        if not good:
            raise DataError(f"no usable slice in {root} among {len(ids)} listed")
        self.ids = good
        self.sizes = sizes

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        paths = slice_paths(self.root, sid)
        ct, pet, mask = (load_gray(paths[m]) for m in MODALITIES)
        if not (ct.shape == pet.shape == mask.shape):
            raise DataError(f"slice {sid}: CT {ct.shape}, PET {pet.shape} and mask {mask.shape} differ in size")
        return {"ct": torch.from_numpy(scale_image(ct))[None],
                "pet": torch.from_numpy(scale_image(pet))[None],
                "mask": torch.from_numpy((mask.astype(np.float32) / 255.0 > 0.5).astype(np.float32))[None],
                "id": sid, "index": i}


def derive_val(train_ids: list[str], fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split train ids per patient into (train, val): ``fraction`` of the patients (at least one)
    go to val, chosen by ``seed``. Raises when there are fewer than two patients."""
    patients = sorted({patient_of(i) for i in train_ids})
    if len(patients) < 2:
        raise DataError(f"cannot derive a validation split from {len(patients)} training patient(s): "
                        "add a val.txt (one id per line) or more patients")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(patients), generator=g).tolist()
    n_val = max(1, round(fraction * len(patients)))
    val_p = {patients[j] for j in order[:n_val]}
    return ([i for i in train_ids if patient_of(i) not in val_p], [i for i in train_ids if patient_of(i) in val_p])
