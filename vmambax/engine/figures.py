"""Figures: the training curve, and a qualitative panel like the paper's Fig. 2."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curve(history: list[dict], path: str):
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "s-", label="val loss")
    a.set_xlabel("epoch"), a.set_ylabel("BCE + soft Dice"), a.legend()
    b.plot(ep, [h["val_dice"] for h in history], "o-", label="val Dice (per-slice mean)")
    b.plot(ep, [h["val_iou"] for h in history], "s-", label="val IoU (per-slice mean)")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay(gray: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha=0.45) -> np.ndarray:
    """(H, W, 3) uint8: ``gray`` with ``mask`` tinted in ``color``."""
    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    m = mask.astype(bool)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def qualitative(cases: list[dict], path: str):
    """Rows of CT | PET | ground truth | prediction; each case: ``id``, ``ct``, ``pet`` (uint8),
    ``target``, ``pred`` (bool), ``dice``."""
    fig, axes = plt.subplots(len(cases), 4, figsize=(10, 2.6 * len(cases)), squeeze=False)
    for row, c in zip(axes, cases):
        for ax, img, title in zip(row, (c["ct"], c["pet"], overlay(c["ct"], c["target"], (40, 220, 40)),
                                         overlay(c["ct"], c["pred"])),
                                  ("CT", "PET", "ground truth", f"prediction (Dice {c['dice']:.3f})")):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
        row[0].set_ylabel(c["id"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
