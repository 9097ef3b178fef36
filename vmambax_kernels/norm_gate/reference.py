"""Pure-PyTorch reference of the norm-gate: exactly SS2D's composition after the scan (the spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None


def norm_gate(y, z, weight, bias, eps):
    """out = LayerNorm_Dm(y channels last).to(z.dtype) * silu(z), as SS2D computes it.

    y (Bt, Dm, H, W) channels first; z (Bt, H, W, Dm); weight, bias (Dm,). The LayerNorm runs in
    the dtype of y (float32 from the scan), its result is rounded to z's dtype before the gate
    (bf16 under autocast). Returns (Bt, H, W, Dm) in z's dtype.
    """
    n = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), weight, bias, eps)   # (Bt, H, W, Dm)
    return n.to(z.dtype) * F.silu(z)
