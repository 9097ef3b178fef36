"""Segmentation metrics of SPEC.md section 5, for one 2D binary mask pair at a time.

Dice, IoU and HD95 follow medpy's definitions (``dc``, ``jc``, ``hd95``: the 95th percentile of the
surface distances of both masks pooled together, surfaces from an erosion with connectivity 1), in
the units of ``spacing`` given as (row, column) pixel size. This is not MONAI's HD95.

Empty masks (our policy, ``EMPTY_POLICY``): both empty -> Dice = IoU = 1, HD95 = 0; exactly one
empty -> Dice = IoU = 0, HD95 = the image diagonal in spacing units. ``policy="published"``
reproduces the published evaluation instead (a centre pixel inserted into an empty mask before
medpy is called; Dice and IoU of two empty masks are 0), for comparison only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EMPTY_POLICY = ("both masks empty: Dice = IoU = 1, HD95 = 0; exactly one empty: Dice = IoU = 0, "
                "HD95 = image diagonal")
POLICIES = ("ours", "published")


def _as_mask(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2D mask (H, W), got an array of shape {x.shape}")
    return x != 0


def _pair(pred, target):
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target: expected the same shape, got {p.shape} and {t.shape}")
    return p, t


def _check_policy(policy: str):
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")


def _spacing(spacing) -> tuple[float, float]:
    try:
        sr, sc = (float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: expected two numbers (row, column), got {spacing!r}") from None
    if not (sr > 0 and sc > 0 and math.isfinite(sr) and math.isfinite(sc)):
        raise ValueError(f"spacing: expected two positive finite numbers, got {spacing!r}")
    return sr, sc


def dice(pred, target, policy: str = "ours") -> float:
    """Dice 2|P&T| / (|P| + |T|) of two 2D masks (any nonzero is foreground)."""
    _check_policy(policy)
    p, t = _pair(pred, target)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0 if policy == "ours" else 0.0
    return 2.0 * int((p & t).sum()) / total


def iou(pred, target, policy: str = "ours") -> float:
    """IoU (Jaccard) |P&T| / |P|T| of two 2D masks (any nonzero is foreground)."""
    _check_policy(policy)
    p, t = _pair(pred, target)
    union = int((p | t).sum())
    if union == 0:
        return 1.0 if policy == "ours" else 0.0
    return int((p & t).sum()) / union


def _surface(m: np.ndarray) -> np.ndarray:
    return m ^ ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1))


def _surface_distances(a: np.ndarray, b: np.ndarray, sampling) -> np.ndarray:
    # Distance from every surface pixel of a to the nearest surface pixel of b.
    return ndimage.distance_transform_edt(~_surface(b), sampling=sampling)[_surface(a)]


def _around_both(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box and one pixel around it (where the image has it).
    Every surface pixel of either mask lies inside, so every surface distance is the same as on the
    whole slice, and the distance transforms run on the tumour's neighbourhood instead: a small
    lesion on a 512x512 slice costs a fraction of the whole slice's transform."""
    rows, cols = np.flatnonzero((p | t).any(axis=1)), np.flatnonzero((p | t).any(axis=0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, p.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, p.shape[1])
    return p[r0:r1, c0:c1], t[r0:r1, c0:c1]


def hd95(pred, target, spacing=(1.0, 1.0), policy: str = "ours") -> float:
    """95th percentile symmetric surface distance (medpy's ``hd95``) in the units of ``spacing``."""
    _check_policy(policy)
    p, t = _pair(pred, target)
    sr, sc = _spacing(spacing)
    if not p.any() or not t.any():
        if policy == "published":
            p, t = p.copy(), t.copy()
            for m in (p, t):
                if not m.any():
                    m[m.shape[0] // 2, m.shape[1] // 2] = True
        elif not p.any() and not t.any():
            return 0.0
        else:
            return math.hypot(p.shape[0] * sr, p.shape[1] * sc)
    p, t = _around_both(p, t)
    d = np.concatenate([_surface_distances(p, t, (sr, sc)), _surface_distances(t, p, (sr, sc))])
    return float(np.percentile(d, 95))


@dataclass
class Confusion:
    """Pixel counts of one slice or of a whole split (pooled)."""
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __iadd__(self, other: "Confusion"):
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn
        return self

    @property
    def dice(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 1.0 if d == 0 else 2 * self.tp / d

    @property
    def iou(self) -> float:
        d = self.tp + self.fp + self.fn
        return 1.0 if d == 0 else self.tp / d

    @property
    def balanced_accuracy(self) -> float:
        """(sensitivity + specificity) / 2; NaN when the target has no foreground or no background
        (sensitivity or specificity undefined)."""
        if self.tp + self.fn == 0 or self.tn + self.fp == 0:
            return float("nan")
        return 0.5 * (self.tp / (self.tp + self.fn) + self.tn / (self.tn + self.fp))


def confusion(pred, target) -> Confusion:
    p, t = _pair(pred, target)
    tp = int((p & t).sum())
    fp = int(p.sum()) - tp
    fn = int(t.sum()) - tp
    return Confusion(tp, fp, fn, p.size - tp - fp - fn)


def balanced_accuracy(pred, target) -> float:
    """Balanced accuracy of one slice; NaN when the target is all foreground or all background."""
    return confusion(pred, target).balanced_accuracy


def empty_case(pred, target) -> str:
    """'both_empty', 'pred_empty', 'target_empty' or 'none' (for the counts printed with results)."""
    p, t = _pair(pred, target)
    pe, te = not p.any(), not t.any()
    return "both_empty" if pe and te else "pred_empty" if pe else "target_empty" if te else "none"
