"""Pure-PyTorch reference of layer_norm: PyTorch's LayerNorm in fp32, then the cast (the spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None


def layer_norm(x, weight, bias, eps, out_dtype):
    """``F.layer_norm(x.float(), (C,), weight, bias, eps).to(out_dtype)``: what an nn.LayerNorm under
    autocast followed by its consumer's cast computes. x (..., C); weight, bias (C,) or None. The
    math runs in float32 (float64 when x is float64), parameters converted to it."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight, bias = (None if t is None else t.to(ct) for t in (weight, bias))
    return F.layer_norm(x.to(ct), x.shape[-1:], weight, bias, eps).to(out_dtype)
