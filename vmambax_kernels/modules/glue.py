"""SS2D's switch for its fused glue: the input's depthwise conv + SiLU (``dwconv_silu``) and the
output's LayerNorm + SiLU gate (``norm_gate``), each one Triton op instead of several PyTorch ops."""
from __future__ import annotations

import os

import torch

from .. import _backend

# op -> environment variable; "0" turns that op's fused path off (read on every eager call, so a
# benchmark can time both paths in one process)
SWITCHES = {"dwconv_silu": "VMAMBAX_FUSED_DWCONV", "norm_gate": "VMAMBAX_FUSED_NORM_GATE"}


@torch.compiler.assume_constant_result
def fused_in_ss2d(op: str, scan_backend: str | None, device_type: str, enabled: bool | None = None) -> bool:
    """Whether SS2D runs ``op`` through its Triton kernel: on CUDA tensors, when the scan's resolved
    backend is not "reference" (which stays the spec, op for op) and Triton can run. ``enabled`` (the
    module's ``fused_dwconv`` / ``fused_norm_gate``) overrides the environment variable of SWITCHES.
    Under torch.compile the answer is fixed at trace time."""
    if enabled is None:
        enabled = os.environ.get(SWITCHES[op], "1") != "0"
    if not enabled or device_type != "cuda":
        return False
    if _backend._choose("selective_scan_2d", scan_backend, device_type) == "reference":
        return False
    if (op, device_type) not in _TRITON_OK:   # once: it imports Triton and reads its version
        _TRITON_OK[op, device_type] = _backend._status(op, "triton").available
    return _TRITON_OK[op, device_type]


_TRITON_OK: dict = {}
