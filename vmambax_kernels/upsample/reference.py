"""Pure-PyTorch reference of up2_bilinear: PyTorch's bilinear interpolation (the spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None


def up2_bilinear(x: torch.Tensor) -> torch.Tensor:
    """(Bt, H, W, C) -> (Bt, 2H, 2W, C), contiguous: ``F.interpolate(scale_factor=2, mode="bilinear",
    align_corners=False)`` of the channels-first view, back to channels last."""
    y = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous()
