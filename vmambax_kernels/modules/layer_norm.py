"""LayerNorm: nn.LayerNorm whose output under CUDA autocast comes already in the autocast dtype."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layer_norm.interface import layer_norm
from .glue import fused_layer_norm, layer_norm_in_training

_HALF = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``nn.LayerNorm`` (same arguments, parameters and state-dict keys) for a norm whose
    every consumer casts its output to the autocast dtype anyway (a Linear, a convolution, SS2D's
    in_proj).

    Under CUDA autocast to bfloat16/float16, on a 1-D ``normalized_shape``, forward returns
    ``vmambax_kernels.layer_norm(x, weight, bias, eps, autocast dtype)``: nn.LayerNorm's fp32 result
    rounded once to the autocast dtype inside the kernel, which is what the consumer would have
    cast it to, without the fp32 tensor and the separate cast (a profile of the bf16 training step
    found PyTorch's LayerNorm kernels at 8.7 + 10 ms and autocast's fp32 -> bf16 copies at 24 ms).
    The output dtype is therefore the autocast dtype, not fp32: do not use it where the output
    meets fp32 activations (a residual, an addition), whose values the rounding would change.
    Anywhere else (CPU, no autocast, float64, wider normalized shapes, Triton unavailable) it is
    exactly nn.LayerNorm's forward.

    By default the kernel runs only where no gradient flows through the norm (inference): in a bf16
    training step of the whole model on an H100 the kernel's backward made the step slower, 338-428
    ms in five runs against 331-332 ms in two with nn.LayerNorm (the same calls; inference 83 against
    91 ms in the first pair), and its fwd+bwd alone is slower than PyTorch's at the model's shapes
    (benchmarks/bench_layer_norm.py; benchmarks/NOTES.md, "Session 2026-11-27, sixth").
    ``fused`` (default None) forces the kernel off (False) or on in training too (True); None
    follows $VMAMBAX_FUSED_LAYER_NORM: "0" off, "train" on in training too, anything else inference only.
    """

    fused: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self._fused_dtype(x)
        if out_dtype is None:
            return super().forward(x)
        # custom ops and autograd Functions are in none of autocast's cast lists: the op sees x and
        # the fp32 parameters as they are (tests/ops/test_layer_norm.py checks it under CPU autocast)
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype, backend="triton")

    def _fused_dtype(self, x: torch.Tensor):
        """The autocast dtype the kernel writes, or None for nn.LayerNorm's forward."""
        if not x.is_cuda or len(self.normalized_shape) != 1 or not torch.is_autocast_enabled("cuda"):
            return None
        dtype = torch.get_autocast_dtype("cuda")
        if dtype not in _HALF or any(t is not None and t.dtype not in _KERNEL_DTYPES
                                     for t in (x, self.weight, self.bias)):
            return None
        if not fused_layer_norm(x.device.type, self.fused):
            return None
        if self.fused is None and not layer_norm_in_training() and torch.is_grad_enabled() \
                and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)):
            return None   # training: nn.LayerNorm's backward is the faster one (see above)
        return dtype
