"""Public norm-gate: validation and backend choice."""
from __future__ import annotations

from .. import _backend, _checks


def norm_gate(y, z, weight, bias, eps=1e-5, *, backend=None):
    """SS2D's output gate: ``LayerNorm_Dm(y channels last) * silu(z)`` in one pass.

    Args:
        y: (Bt, Dm, H, W) channels first, float32 from the scan (bfloat16/float16 accepted).
        z: (Bt, H, W, Dm) channels last, any strides (in SS2D contiguous, in_proj's second GEMM),
            float32 | bfloat16 | float16; sets the output dtype.
        weight, bias: (Dm,) the LayerNorm's affine parameters (``out_norm.weight/bias``).
        eps: the LayerNorm's epsilon (``out_norm.eps``), >= 0.
        backend: None (auto) | "triton" | "reference".
    Returns out (Bt, H, W, Dm) contiguous, in z's dtype. Differentiable in y, z, weight and bias.

    The LayerNorm runs in fp32. The reference (today's composition) rounds its result to z's
    dtype before multiplying; the Triton kernel multiplies in fp32 and rounds once. Under autograd
    the kernel saves only the per-position mean and 1/std (fp32) besides its inputs.
    """
    device = _checks.norm_gate_args(y, z, weight, bias, eps)
    mod = _backend.resolve("norm_gate", backend, device)
    return mod.norm_gate(y, z, weight, bias, float(eps))
