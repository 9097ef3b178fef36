"""Pure-PyTorch reference of the fused depthwise conv + SiLU: exactly SS2D's composition (the spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None


def dwconv_silu(x, weight, bias=None):
    """silu(conv2d(x channels first, weight, bias, padding (K-1)//2, groups=Dm)), as SS2D computes it.

    x (Bt, H, W, Dm) channels last, any strides; weight (Dm, 1, K, K); bias (Dm,) or None.
    Returns (Bt, Dm, H, W) contiguous in x's dtype. The math runs in float32 (float64 for float64
    x) with the parameters' own values: under autocast SS2D today rounds the fp32 weight and bias
    to bf16 for cuDNN, which the fused op does not do (interface.py says why).
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    K = weight.shape[-1]
    xs = x.permute(0, 3, 1, 2).contiguous()                                     # (Bt, Dm, H, W)
    z = F.conv2d(xs.to(ct), weight.to(ct), None if bias is None else bias.to(ct),
                 padding=(K - 1) // 2, groups=x.shape[-1])
    return F.silu(z).to(x.dtype)
