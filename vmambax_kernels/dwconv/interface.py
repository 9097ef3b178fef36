"""Public fused depthwise conv + SiLU (SS2D's input glue): validation and backend choice."""
from __future__ import annotations

from .. import _backend, _checks

MAX_KERNEL = 7


def _args(x, weight, bias):
    _checks.tensor("x", x, 4)
    _checks.supported_dtype("x", x)
    Bt, H, W, Dm = x.shape
    if min(Bt, H, W, Dm) < 1:
        raise ValueError(f"x: expected every dimension >= 1, got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, 4)
    _checks.supported_dtype("weight", weight)
    K = weight.shape[-1]
    if K % 2 == 0 or not 1 <= K <= MAX_KERNEL:
        raise ValueError(f"weight: expected an odd kernel size 1..{MAX_KERNEL} (padding (K-1)//2 keeps "
                         f"H x W), got shape {tuple(weight.shape)}")
    _checks.shape("weight", weight, (Dm, 1, K, K))
    if bias is not None:
        _checks.tensor("bias", bias, 1)
        _checks.supported_dtype("bias", bias)
        _checks.shape("bias", bias, (Dm,))
    return _checks.same_device({"x": x, "weight": weight, "bias": bias})


def dwconv_silu(x, weight, bias=None, *, backend=None):
    """SS2D's input glue in one op: ``silu(conv2d(x.permute(0, 3, 1, 2), weight, bias,
    padding=(K - 1) // 2, groups=Dm))``, the transpose to channels first included.

    Args:
        x: (Bt, H, W, Dm) channels last, float32 | bfloat16 | float16; any strides (in SS2D
            contiguous, the first of in_proj's two GEMMs). A last-dim stride other than 1 is copied.
        weight: (Dm, 1, K, K), K odd in 1..7 (``conv2d.weight`` of nn.Conv2d(Dm, Dm, K, groups=Dm)).
        bias: (Dm,) or None (``conv2d.bias``).
        backend: None (auto) | "triton" | "reference".
    Returns (Bt, Dm, H, W) contiguous in x's dtype. Differentiable in x, weight and bias; their
    gradients come in their own dtypes (dx contiguous channels last).

    The math runs in fp32 with weight and bias as given: pass the fp32 parameters themselves, not
    autocast's bf16 copies. Against the float64 truth that is more accurate than today's autocast
    conv (bf16 weights, output rounded to bf16 before the SiLU, rounded again after), and it is
    what STYLE.md's tolerance rule compares against (the reference in fp32 on the same values).
    """
    device = _args(x, weight, bias)
    mod = _backend.resolve("dwconv_silu", backend, device)
    return mod.dwconv_silu(x, weight, bias)
