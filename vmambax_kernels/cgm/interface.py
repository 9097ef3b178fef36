"""Public CGM gate: validation and backend choice (SPEC.md section 2)."""
from __future__ import annotations

from .. import _backend, _checks


def cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=True, *, backend=None):
    """Per-pixel part of CGM for both modalities.

    Args:
        x_ct, x_pet: (Bt, C, H, W) float32 | bfloat16 | float16.
        c_ct, c_pet: (Bt, C) channel gates, already through the sigmoid.
        w_ct, w_pet: (1, 2C, 3, 3) spatial conv weights; w_m acts on cat([X_other, X_m]).
        residual: True gives Y_m = X_m * (1 + c_m * s_m), False gives X_m * c_m * s_m,
            with s_m = sigmoid(conv3x3(cat([X_other, X_m]), w_m)) (no bias, padding 1).
        backend: None (auto) | "triton" | "reference".
    Returns (y_ct, y_pet), each (Bt, C, H, W) in the dtype of x. Differentiable in every tensor.
    """
    _, device = _checks.cgm_gate_args(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet)
    mod = _backend.resolve("cgm_gate", backend, device)
    return mod.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, bool(residual))
