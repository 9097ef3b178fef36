"""Synthetic PET-CT in the PCLT20K layout (SPEC.md section 4), deterministic by seed.

Each patient is a small stack of chest slices. CT: air, body with a fat rim, two lungs with
texture and vessels, mediastinum, heart (lower slices), spine; rendered through the paper's lung
window [-1200, -200] HU. PET: low lung and body uptake, blood pool, a hot myocardium, noise and
blur. Tumors are lobulated spheres in a lung, often touching the mediastinum, dense on CT and hot
on PET. Decoys make both modalities necessary: benign nodules and vessels are dense on CT but cold
on PET, and hot spots outside the lungs (heart, body wall) have no CT lesion in the lung window.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

CT_WINDOW_HU = (-1200.0, -200.0)   # the paper's lung window
PET_WINDOW_SUV = (0.0, 10.0)       # how PET uptake maps to 8 bits here (and in `predict` for NIfTI)
SLICE_THICKNESS_MM = 3.0


def render_ct(hu: np.ndarray, window=CT_WINDOW_HU) -> np.ndarray:
    lo, hi = window
    return np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def render_pet(suv: np.ndarray, window=PET_WINDOW_SUV) -> np.ndarray:
    lo, hi = window
    return np.round(np.clip((suv - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


@dataclass
class _Blob:
    y: float       # centre, normalised image coordinates in [-1, 1]
    x: float
    z: float       # centre slice (fractional)
    r: float       # radius, normalised units
    rz: float      # half-extent in slices
    lobes: np.ndarray  # angular radius modulation (lobulated outline)
    value: float


def _in_lung(rng, side, medial):
    # Points near the medial edge make juxta-mediastinal tumors, which CT alone cannot delimit.
    cx = side * (0.16 + 0.06 * rng.random()) if medial else side * (0.25 + 0.22 * rng.random())
    return float(rng.uniform(-0.35, 0.3)), float(cx)


def _blob(rng, n_slices, yx, r, value):
    return _Blob(yx[0], yx[1], float(rng.uniform(0.3, 0.7) * (n_slices - 1)), r,
                 max(1.0, float(rng.uniform(0.35, 0.6)) * n_slices), rng.uniform(-0.25, 0.25, size=3), value)


def _blob_mask(b: _Blob, yy, xx, z):
    dz = (z - b.z) / b.rz
    if abs(dz) >= 1:
        return np.zeros_like(yy, dtype=bool)
    ang = np.arctan2(yy - b.y, xx - b.x)
    rad = b.r * math.sqrt(1 - dz * dz) * (1 + b.lobes[0] * np.sin(3 * ang + b.lobes[1])
                                          + 0.5 * b.lobes[2] * np.cos(5 * ang))
    return (yy - b.y) ** 2 + (xx - b.x) ** 2 < rad ** 2


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def _patient(rng, size: int, n_slices: int):
    """Yields (hu, suv, mask) per slice for one patient."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body_ry, body_rx = rng.uniform(0.62, 0.72), rng.uniform(0.82, 0.92)
    lung_ry, lung_rx = rng.uniform(0.42, 0.52), rng.uniform(0.26, 0.32)
    n_tumors = int(rng.integers(1, 3))
    tumors = [_blob(rng, n_slices, _in_lung(rng, rng.choice([-1, 1]), rng.random() < 0.5),
                    rng.uniform(0.06, 0.16), rng.uniform(4, 12)) for _ in range(n_tumors)]
    nodules = [_blob(rng, n_slices, _in_lung(rng, rng.choice([-1, 1]), False),
                     rng.uniform(0.03, 0.06), 0.0) for _ in range(int(rng.integers(0, 3)))]
    hot = [_blob(rng, n_slices, (rng.uniform(-0.5, 0.5), rng.choice([-1, 1]) * rng.uniform(0.7, 0.8)),
                 rng.uniform(0.04, 0.08), rng.uniform(3, 8)) for _ in range(int(rng.integers(0, 3)))]
    vessels = [(rng.uniform(-0.4, 0.35), rng.choice([-1, 1]) * rng.uniform(0.2, 0.5), rng.uniform(0.01, 0.025))
               for _ in range(int(rng.integers(8, 20)))]
    heart_from = rng.uniform(0.35, 0.6) * n_slices
    psf = 1.2 * size / 128  # PET's coarser resolution, in pixels

    for z in range(n_slices):
        scale = 0.85 + 0.15 * math.sin(math.pi * (z + 0.5) / n_slices)  # lungs widest mid-stack
        body = _ellipse(yy, xx, 0.05, 0.0, body_ry, body_rx)
        inner = _ellipse(yy, xx, 0.05, 0.0, body_ry - 0.05, body_rx - 0.05)
        lungs = (_ellipse(yy, xx, -0.02, -0.42, lung_ry * scale, lung_rx * scale)
                 | _ellipse(yy, xx, -0.02, 0.42, lung_ry * scale, lung_rx * scale))
        heart = _ellipse(yy, xx, 0.2, -0.1, 0.22, 0.2) if z >= heart_from else np.zeros_like(body)
        lungs &= ~heart
        spine = _ellipse(yy, xx, 0.55, 0.0, 0.09, 0.09)

        hu = np.full(yy.shape, -1000.0)
        hu[body] = -100.0
        hu[inner] = 40.0
        hu[lungs] = -850.0 + 40 * ndimage.gaussian_filter(rng.standard_normal(yy.shape), 1.5)[lungs]
        for vy, vx, vr in vessels:
            hu[_ellipse(yy, xx, vy, vx * scale, vr, vr) & lungs] = -60.0
        hu[spine] = 650.0
        suv = np.zeros(yy.shape)
        suv[body] = 0.8
        suv[lungs] = 0.35
        suv[inner & ~lungs & (np.abs(xx) < 0.2)] = 1.5       # mediastinal blood pool
        suv[heart] = 1.8
        suv[heart & ~_ellipse(yy, xx, 0.2, -0.1, 0.15, 0.13)] = rng.uniform(3, 7)  # myocardium
        suv[spine] = 1.4

        mask = np.zeros(yy.shape, dtype=bool)
        for b in nodules:
            m = _blob_mask(b, yy, xx, z)
            hu[m] = 10.0
        for b in hot:
            suv[_blob_mask(b, yy, xx, z) & body] = b.value
        for b in tumors:
            m = _blob_mask(b, yy, xx, z) & inner & ~spine
            hu[m] = 30.0 + 15 * rng.standard_normal(int(m.sum()))
            suv[m] = b.value * (0.7 + 0.3 * rng.random(int(m.sum())))
            mask |= m
        hu += 12 * rng.standard_normal(hu.shape)
        suv = ndimage.gaussian_filter(suv, psf)
        suv = np.clip(suv * (1 + 0.15 * ndimage.gaussian_filter(rng.standard_normal(suv.shape), 1.0))
                      + 0.1 * rng.standard_normal(suv.shape), 0, None)
        yield np.round(hu).astype(np.float32), suv.astype(np.float32), mask  # CT is stored in whole HU


def _split(patients: list[str], rng) -> dict[str, list[str]]:
    order = list(rng.permutation(len(patients)))
    n = len(patients)
    n_test = max(1, round(0.2 * n))
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    test = sorted(patients[i] for i in order[:n_test])
    val = sorted(patients[i] for i in order[n_test:n_test + n_val])
    train = sorted(patients[i] for i in order[n_test + n_val:])
    return {"train": train, "val": val, "test": test}


def make_synthetic_dataset(out: str, patients: int = 8, size: int = 128, slices: int = 12,
                           seed: int = 0, nifti: bool = False) -> dict:
    """Write a synthetic PET-CT dataset to ``out`` in the PCLT20K layout; returns its description.

    ``out/<P>/<P>_<slice>_{CT,PET,mask}.png`` (8-bit, ``size`` x ``size``), ``train.txt``,
    ``val.txt`` (when ``patients >= 3``), ``test.txt`` (split per patient), ``dataset.json``
    (pixel spacing in mm, windows, seed). With ``nifti``, also ``out/nifti/<P>_{CT,PET,mask}.nii.gz``
    (HU, SUV, labels; the PNG slice z is the NIfTI array ``[:, :, z].T``).
    """
    for name, v, lo in (("patients", patients, 2), ("size", size, 16), ("slices", slices, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    os.makedirs(out, exist_ok=True)
    spacing = (0.98 * 512 / size, 0.98 * 512 / size)  # a 500 mm field of view, as in PCLT20K-like CT
    names = [f"P{i:04d}" for i in range(patients)]
    n_fg = 0
    for pi, name in enumerate(names):
        rng = np.random.default_rng([seed, pi])
        os.makedirs(os.path.join(out, name), exist_ok=True)
        vols = []
        for z, (hu, suv, mask) in enumerate(_patient(rng, size, slices)):
            stem = os.path.join(out, name, f"{name}_{z:03d}")
            Image.fromarray(render_ct(hu)).save(stem + "_CT.png")
            Image.fromarray(render_pet(suv)).save(stem + "_PET.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(stem + "_mask.png")
            n_fg += bool(mask.any())
            if nifti:
                vols.append((hu, suv, mask))
        if nifti:
            _write_nifti(out, name, vols, spacing)
    splits = _split(names, np.random.default_rng([seed, 1_000_003]))
    for split, pats in splits.items():
        if not pats:
            continue
        ids = [f"{p}_{z:03d}" for p in pats for z in range(slices)]
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    desc = {"name": "vmambax-synthetic", "seed": seed, "patients": patients, "slices_per_patient": slices,
            "size": [size, size], "spacing": list(spacing), "spacing_unit": "mm",
            "ct_window_hu": list(CT_WINDOW_HU), "pet_window_suv": list(PET_WINDOW_SUV),
            "slices_with_tumor": n_fg, "splits": {k: len(v) for k, v in splits.items()}}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(desc, f, indent=2)
    log.info("synthetic dataset: %d patients x %d slices of %dx%d in %s", patients, slices, size, size, out)
    return desc


def _write_nifti(out, name, vols, spacing):
    import nibabel as nib
    os.makedirs(os.path.join(out, "nifti"), exist_ok=True)
    affine = np.diag([spacing[1], spacing[0], SLICE_THICKNESS_MM, 1.0])
    for i, (suffix, dtype) in enumerate((("CT", np.int16), ("PET", np.float32), ("mask", np.uint8))):
        vol = np.stack([v[i].T for v in vols], axis=-1).astype(dtype)  # (W, H, Z): x, y, z
        nib.save(nib.Nifti1Image(vol, affine), os.path.join(out, "nifti", f"{name}_{suffix}.nii.gz"))
