"""Public layer_norm: validation and backend choice."""
from __future__ import annotations

import torch

from .. import _backend, _checks


def layer_norm(x, weight=None, bias=None, eps=1e-5, out_dtype=torch.float32, *, backend=None):
    """LayerNorm over the last dimension, its fp32 result rounded once to ``out_dtype``:
    ``F.layer_norm(x.float(), (C,), weight, bias, eps).to(out_dtype)``.

    Under autocast PyTorch's LayerNorm runs in fp32 and returns fp32, and a consumer such as a
    Linear or a convolution casts that to the autocast dtype: with ``out_dtype`` that dtype this op
    gives the consumer the same values without the separate cast (and its backward takes the
    consumer's 16-bit gradient as the cast's backward would, widened to fp32).

    Args:
        x: (..., C), any leading shape and strides, float32 | bfloat16 | float16. Rows that are a
            channels-first map permuted to channels last are read in place; strides that merge
            into neither form are copied once.
        weight, bias: (C,) or None (``nn.LayerNorm``'s affine parameters), float32 in practice.
        eps: >= 0.
        out_dtype: float32 | bfloat16 | float16 (| float64).
        backend: None (auto) | "triton" | "reference".
    Returns out (..., C) contiguous, in out_dtype. Differentiable in x, weight and bias: dx in x's
    dtype, dweight and dbias summed in fp32 (per-program partial sums added in a fixed order, so
    the result does not depend on scheduling), then in the parameters' dtype. Under autograd the
    kernels save only the per-row mean and 1/std (fp32) besides the inputs.
    """
    device = _checks.layer_norm_args(x, weight, bias, eps, out_dtype)
    mod = _backend.resolve("layer_norm", backend, device)
    return mod.layer_norm(x, weight, bias, float(eps), out_dtype)
