"""Training augmentation: flips, shift/scale, random crop; deterministic from a per-sample seed.

Each sample's randomness comes from its own generator seeded by (seed, epoch, index), so the
augmented data depend neither on the number of loader workers nor on where a run was resumed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BACKGROUND = -1.6  # a black pixel after scaling (v / 255 * 3.2 - 1.6)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    s = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(s)


def _u(g, lo, hi) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def augment(sample: dict, size: tuple[int, int], g: torch.Generator, scale=(0.8, 1.2), shift=0.1) -> dict:
    """Random horizontal/vertical flip, scale and shift (one affine for CT, PET and mask), then a
    random ``size`` crop (padded with background when the image is smaller)."""
    x = torch.cat([sample["ct"], sample["pet"], sample["mask"]])            # (3, H, W)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-2)
    s = _u(g, *scale)
    tx, ty = _u(g, -shift, shift), _u(g, -shift, shift)
    theta = torch.tensor([[1 / s, 0, tx], [0, 1 / s, ty]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 3) + tuple(x.shape[-2:]), align_corners=False)
    off = torch.tensor([-BACKGROUND, -BACKGROUND, 0.0])[:, None, None]      # zero padding == background
    x = F.grid_sample((x + off)[None], grid, mode="bilinear", align_corners=False)[0] - off
    H, W = x.shape[-2:]
    ch, cw = size
    if H < ch or W < cw:
        ph, pw = max(0, ch - H), max(0, cw - W)
        x = torch.stack([F.pad(x[i], (0, pw, 0, ph), value=v) for i, v in enumerate((BACKGROUND, BACKGROUND, 0.0))])
        H, W = x.shape[-2:]
    top = int(torch.randint(0, H - ch + 1, (), generator=g))
    left = int(torch.randint(0, W - cw + 1, (), generator=g))
    x = x[:, top:top + ch, left:left + cw]
    return {**sample, "ct": x[0:1].contiguous(), "pet": x[1:2].contiguous(),
            "mask": (x[2:3] > 0.5).float()}


class Augmented(torch.utils.data.Dataset):
    """Wraps a dataset with ``augment``; call ``set_epoch`` before each epoch."""

    def __init__(self, base, size: tuple[int, int], seed: int):
        self.base, self.size, self.seed, self.epoch = base, size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return augment(self.base[i], self.size, sample_generator(self.seed, self.epoch, i))
