"""Public norm-gate: validation and backend choice; SS2D's switch for the fused path."""
from __future__ import annotations

import os

import torch

from .. import _backend, _checks

ENV_SWITCH = "VMAMBAX_FUSED_NORM_GATE"


def norm_gate(y, z, weight, bias, eps=1e-5, *, backend=None):
    """SS2D's output gate: ``LayerNorm_Dm(y channels last) * silu(z)`` in one pass.

    Args:
        y: (Bt, Dm, H, W) channels first, float32 from the scan (bfloat16/float16 accepted).
        z: (Bt, H, W, Dm) channels last, any strides (in SS2D a chunk of in_proj's output),
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


@torch.compiler.assume_constant_result
def fused_in_ss2d(scan_backend: str | None, device_type: str, enabled: bool | None = None) -> bool:
    """Whether SS2D runs its norm-gate through the Triton kernel: on CUDA tensors, when the scan's
    resolved backend is not "reference" and Triton can run. ``enabled`` (SS2D.fused_norm_gate)
    overrides ${ENV_SWITCH} (read on every call, so a benchmark can time both in one process)."""
    if enabled is None:
        enabled = os.environ.get(ENV_SWITCH, "1") != "0"
    if not enabled or device_type != "cuda":
        return False
    if _backend._choose("selective_scan_2d", scan_backend, device_type) == "reference":
        return False
    if _TRITON_OK.get(device_type) is None:   # once: it imports Triton and reads its version
        _TRITON_OK[device_type] = _backend._status("norm_gate", "triton").available
    return _TRITON_OK[device_type]


_TRITON_OK: dict = {}
