"""vmambax_kernels: fused four-direction 2D selective scan and CGM gate, with drop-in SS2D.

Public API (SPEC.md sections 1-3): ``selective_scan_2d``, ``cross_selective_scan_2d``, ``cgm_gate``,
``norm_gate`` (SS2D's LayerNorm + SiLU gate), ``dwconv_silu``, ``layer_norm`` (LayerNorm written in
the consumer's dtype), ``up2_bilinear`` (the decoder's bilinear x2, with a gathering backward),
``available_backends``, ``SS2D`` (``vmambax_kernels.modules`` also holds
``LayerNorm``).
"""
from ._backend import BackendStatus, available_backends
from .cgm.interface import cgm_gate
from .dwconv.interface import dwconv_silu
from .layer_norm.interface import layer_norm
from .norm_gate.interface import norm_gate
from .selective_scan.interface import cross_selective_scan_2d, selective_scan_2d
from .upsample.interface import up2_bilinear

__version__ = "0.1.0"


def __getattr__(name):  # SS2D imports nn modules; keep `import vmambax_kernels` light
    if name == "SS2D":
        from .modules.ss2d import SS2D
        return SS2D
    raise AttributeError(f"module 'vmambax_kernels' has no attribute {name!r}")


__all__ = ["selective_scan_2d", "cross_selective_scan_2d", "cgm_gate", "norm_gate", "available_backends",
           "BackendStatus", "SS2D", "dwconv_silu", "layer_norm", "up2_bilinear"]
