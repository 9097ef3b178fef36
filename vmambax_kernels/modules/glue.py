"""The switches of the fused glue around PyTorch modules: SS2D's input depthwise conv + SiLU
(``dwconv_silu``) and output LayerNorm + SiLU gate (``norm_gate``), each one Triton op instead of
several PyTorch ops, and the model's LayerNorms that write their output in the autocast dtype
(``layer_norm``, through ``vmambax_kernels.modules.LayerNorm``)."""
from __future__ import annotations

import os

import torch

from .. import _backend

# op -> environment variable; "0" turns that op's fused path off (read on every eager call, so a
# benchmark can time both paths in one process)
SWITCHES = {"dwconv_silu": "VMAMBAX_FUSED_DWCONV", "norm_gate": "VMAMBAX_FUSED_NORM_GATE",
            "layer_norm": "VMAMBAX_FUSED_LAYER_NORM", "up2_bilinear": "VMAMBAX_FUSED_UP2"}


def _enabled(op: str, enabled: bool | None) -> bool:
    return os.environ.get(SWITCHES[op], "1") != "0" if enabled is None else enabled


def _triton_ok(op: str, device_type: str) -> bool:
    if (op, device_type) not in _TRITON_OK:   # once: it imports Triton and reads its version
        _TRITON_OK[op, device_type] = _backend._status(op, "triton").available
    return _TRITON_OK[op, device_type]


@torch.compiler.assume_constant_result
def fused_in_ss2d(op: str, scan_backend: str | None, device_type: str, enabled: bool | None = None) -> bool:
    """Whether SS2D runs ``op`` through its Triton kernel: on CUDA tensors, when the scan's resolved
    backend is not "reference" (which stays the spec, op for op) and Triton can run. ``enabled`` (the
    module's ``fused_dwconv`` / ``fused_norm_gate``) overrides the environment variable of SWITCHES.
    Under torch.compile the answer is fixed at trace time."""
    if not _enabled(op, enabled) or device_type != "cuda":
        return False
    if _backend._choose("selective_scan_2d", scan_backend, device_type) == "reference":
        return False
    return _triton_ok(op, device_type)


def _fused_in_model(op: str, device_type: str, enabled: bool | None) -> bool:
    """Whether a model op outside SS2D runs its Triton kernel: on CUDA tensors, when Triton can run and
    $VMAMBAX_BACKEND does not ask for the reference (which stays the spec, op for op). ``enabled``
    overrides the op's environment variable of SWITCHES."""
    if not _enabled(op, enabled) or device_type != "cuda":
        return False
    if os.environ.get("VMAMBAX_BACKEND") == "reference":
        return False
    return _triton_ok(op, device_type)


@torch.compiler.assume_constant_result
def fused_layer_norm(device_type: str, enabled: bool | None = None) -> bool:
    """Whether ``vmambax_kernels.modules.LayerNorm`` may run the Triton ``layer_norm`` (it also needs
    CUDA autocast to a 16-bit dtype), by _fused_in_model; ``enabled`` is the module's ``fused``.
    Under torch.compile the answer is fixed at trace time."""
    return _fused_in_model("layer_norm", device_type, enabled)


@torch.compiler.assume_constant_result
def fused_up2(device_type: str) -> bool:
    """Whether the decoder's bilinear x2 runs ``up2_bilinear``'s Triton backend (its gathering
    backward), by _fused_in_model; $VMAMBAX_FUSED_UP2=0 keeps PyTorch's. Under torch.compile the
    answer is fixed at trace time."""
    return _fused_in_model("up2_bilinear", device_type, None)


@torch.compiler.assume_constant_result
def layer_norm_in_training() -> bool:
    """$VMAMBAX_FUSED_LAYER_NORM=train: the LayerNorm module's kernel also where a gradient flows
    (by default only in inference). Under torch.compile the answer is fixed at trace time."""
    return os.environ.get(SWITCHES["layer_norm"]) == "train"


_TRITON_OK: dict = {}
