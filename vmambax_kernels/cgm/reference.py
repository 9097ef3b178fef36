"""Pure-PyTorch reference of the CGM gate's per-pixel part: the spec (SPEC.md section 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None


def spatial_gate(x_primary, x_secondary, w):
    """s_m = sigmoid(Conv3x3(cat([X_other, X_m]))), (Bt, 1, H, W); no bias, padding 1."""
    return torch.sigmoid(F.conv2d(torch.cat([x_secondary, x_primary], dim=1), w, padding=1))


def cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=True):
    """Y_m = X_m * (1 + c_m * s_m) (or X_m * c_m * s_m); computed in float32 (float64 for
    float64 inputs), returned in the dtype of x. Shapes as the public ``cgm_gate``."""
    ct = torch.float64 if x_ct.dtype == torch.float64 else torch.float32
    xc, xp = x_ct.to(ct), x_pet.to(ct)
    out = []
    for x, other, c, w in ((xc, xp, c_ct, w_ct), (xp, xc, c_pet, w_pet)):
        gate = c.to(ct)[:, :, None, None] * spatial_gate(x, other, w.to(ct))
        out.append((x * (1 + gate) if residual else x * gate).to(x_ct.dtype))
    return tuple(out)
