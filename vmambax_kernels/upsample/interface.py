"""Public up2_bilinear: validation and backend choice."""
from __future__ import annotations

from .. import _backend, _checks


def up2_bilinear(x, *, backend=None):
    """Bilinear x2 upsampling of a channels-last map, as the decoder's expanding layers use it.

    Args:
        x: (Bt, H, W, C), any strides, float32 | bfloat16 | float16 | float64.
        backend: None (auto) | "triton" | "reference".
    Returns (Bt, 2H, 2W, C) contiguous in x's dtype: ``F.interpolate(x.permute(0, 3, 1, 2),
    scale_factor=2, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)``. The Triton backend
    computes the forward with that same PyTorch call (so torch.compile still fuses it with its
    neighbours) and replaces only the backward: each input gradient gathers its 4 x 4 stencil of the
    output gradient (weights 1/4 and 3/4 per axis, the edge rows and columns folded as the clamped
    source index folds them), summed in fp32 and rounded once, where PyTorch's backward (and
    Inductor's) scatters every output gradient into four inputs with atomic adds.
    """
    _checks.planes("x", x)
    mod = _backend.resolve("up2_bilinear", backend, x.device)
    return mod.up2_bilinear(x)
