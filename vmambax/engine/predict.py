"""Segment new scans: PNG pairs, folders of PNG pairs, or NIfTI volumes (slice by slice).

PNG inputs are 8-bit slices as in the PCLT20K layout. NIfTI inputs are raw values: CT in HU through
the paper's lung window [-1200, -200], PET in SUV through [0, 10] (the mapping the synthetic data
use; set ``pet_window`` to match your data). Slice z of a volume is the array ``[:, :, z]``
transposed to (rows = y, columns = x); the mask is written back with the input's affine and header.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from vmambax.data.dataset import DataError, load_gray, scale_image
from vmambax.data.synth import CT_WINDOW_HU, PET_WINDOW_SUV, render_ct, render_pet
from vmambax.engine import checkpoint as ckpt_io
from vmambax.engine.common import amp_dtype, check_writable, pick_device
from vmambax.engine.figures import overlay
from vmambax.engine.inference import InferenceForward

log = logging.getLogger(__name__)

NIFTI = (".nii", ".nii.gz")


def _is_nifti(p: str) -> bool:
    return p.lower().endswith(NIFTI)


def _stem(p: str) -> str:
    name = os.path.basename(p)
    for ext in (".nii.gz", ".nii", ".png"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name[:-3] if name.endswith("_CT") else name


def _pairs_in_folders(ct_dir: str, pet_dir: str) -> list[tuple[str, str]]:
    # <x>_CT.png pairs with <x>_PET.png; otherwise a file pairs with the same name in the PET folder.
    cts = sorted(f for f in os.listdir(ct_dir)
                 if f.lower().endswith(".png") and not f.endswith(("_PET.png", "_mask.png")))
    if not cts:
        raise DataError(f"ct: the folder {ct_dir} holds no CT PNG files")
    pairs = []
    for f in cts:
        pf = f[:-7] + "_PET.png" if f.endswith("_CT.png") else f
        pairs.append((os.path.join(ct_dir, f), os.path.join(pet_dir, pf)))
    return pairs


class _Predictor:
    def __init__(self, checkpoint, device, amp, threshold, graphs, compile):
        model, _ = ckpt_io.load_model(checkpoint)
        self.dev = pick_device(device)
        self.infer = InferenceForward(model.to(self.dev), self.dev, amp_dtype(amp, self.dev), graphs=graphs,
                                      compile=compile)
        self.logit_thr = float(np.log(threshold / (1 - threshold)))

    def __call__(self, ct8: np.ndarray, pet8: np.ndarray) -> np.ndarray:
        """(S, H, W) uint8 CT and PET slices -> (S, H, W) bool masks."""
        ct = torch.from_numpy(scale_image(ct8))[:, None].to(self.dev)
        pet = torch.from_numpy(scale_image(pet8))[:, None].to(self.dev)
        logits = self.infer(ct, pet)
        return (logits.float() > self.logit_thr).cpu().numpy()[:, 0]


def predict(checkpoint: str, ct: str, pet: str, out: str, device: str | None = None, amp: str = "auto",
            threshold: float = 0.5, batch_size: int = 4, ct_window=CT_WINDOW_HU, pet_window=PET_WINDOW_SUV,
            skip_bad: bool = False, cuda_graphs: bool = True, compile=False) -> list[str]:
    """Segment ``ct``/``pet`` (two PNG files, two folders, or two NIfTI volumes) into ``out``.

    Writes ``<name>_mask.png`` (0/255) and ``<name>_overlay.png`` per PNG pair; per NIfTI pair,
    ``<name>_mask.nii.gz`` (same shape, affine and header as the CT) and ``<name>_overlay/`` with
    one PNG per slice that has tumor. Returns the paths written. ``cuda_graphs``: on a GPU, replay
    the forward from CUDA graphs (``vmambax.engine.inference``; the same logits); ``compile``: run
    it through ``torch.compile`` (True, or a backend's name).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold}")
    for name, p in (("ct", ct), ("pet", pet)):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{name}: {p} does not exist")
    if os.path.isdir(ct) != os.path.isdir(pet) or _is_nifti(ct) != _is_nifti(pet):
        raise ValueError(f"ct and pet: expected two PNG files, two folders or two NIfTI files, got {ct} and {pet}")
    check_writable(out)
    run = _Predictor(checkpoint, device, amp, threshold, cuda_graphs, compile)
    if _is_nifti(ct):
        return _predict_nifti(run, ct, pet, out, batch_size, ct_window, pet_window)
    pairs = _pairs_in_folders(ct, pet) if os.path.isdir(ct) else [(ct, pet)]
    written, bad = [], []
    for c, p in pairs:
        try:
            c8, p8 = load_gray(c), load_gray(p)
            if c8.shape != p8.shape:
                raise DataError(f"ct and pet: {c} is {c8.shape[0]}x{c8.shape[1]} "
                                f"but {p} is {p8.shape[0]}x{p8.shape[1]}")
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        mask = run(c8[None], p8[None])[0]
        stem = os.path.join(out, _stem(c))
        Image.fromarray(mask.astype(np.uint8) * 255).save(stem + "_mask.png")
        Image.fromarray(overlay(c8, mask)).save(stem + "_overlay.png")
        written += [stem + "_mask.png", stem + "_overlay.png"]
    log.info("predicted %d slice pair(s) into %s (%d skipped)", len(pairs) - len(bad), out, len(bad))
    return written


def _load_volume(path: str, name: str):
    import nibabel as nib
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{name}: {path} cannot be read as NIfTI: {exc}") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D volume, got shape {data.shape} in {path}")
    return img, data


def _predict_nifti(run, ct, pet, out, batch_size, ct_window, pet_window) -> list[str]:
    import nibabel as nib
    ct_img, ct_vol = _load_volume(ct, "ct")
    pet_img, pet_vol = _load_volume(pet, "pet")
    if ct_vol.shape != pet_vol.shape:
        raise DataError(f"ct and pet: volumes differ in shape, {ct_vol.shape} ({ct}) vs {pet_vol.shape} ({pet}); "
                        "resample the PET onto the CT grid first")
    if not np.allclose(ct_img.affine, pet_img.affine, atol=1e-3):
        log.warning("ct and pet affines differ; segmenting on the voxel grid as given")
    ct8 = render_ct(ct_vol, ct_window).transpose(2, 1, 0)    # (Z, Y, X): slice z, rows y, columns x
    pet8 = render_pet(pet_vol, pet_window).transpose(2, 1, 0)
    masks = np.concatenate([run(ct8[s:s + batch_size], pet8[s:s + batch_size])
                            for s in range(0, ct8.shape[0], batch_size)])
    stem = os.path.join(out, _stem(ct))
    header = ct_img.header.copy()
    header.set_data_dtype(np.uint8)
    mask_img = nib.Nifti1Image(masks.transpose(2, 1, 0).astype(np.uint8), ct_img.affine, header)
    nib.save(mask_img, stem + "_mask.nii.gz")
    written = [stem + "_mask.nii.gz"]
    os.makedirs(stem + "_overlay", exist_ok=True)
    for z in np.flatnonzero(masks.any(axis=(1, 2))):
        path = os.path.join(stem + "_overlay", f"slice_{z:04d}.png")
        Image.fromarray(overlay(ct8[z], masks[z])).save(path)
        written.append(path)
    log.info("predicted %d slices of %s into %s (%d with tumor)", len(masks), ct, out, len(written) - 1)
    return written
