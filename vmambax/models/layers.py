"""Small building blocks shared by the encoder, the fusion modules and the decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from vmambax_kernels.modules import LayerNorm


def cast_norm(norm_layer, dim: int) -> nn.Module:
    """A LayerNorm whose every consumer casts its output to the autocast dtype (a Linear, a
    convolution, SS2D's in_proj): ``norm_layer(dim)``, by default vmambax_kernels' LayerNorm, which
    under CUDA autocast in inference writes that dtype itself (the same values, without PyTorch's
    separate cast)."""
    return (norm_layer or LayerNorm)(dim)


def fp32_norm(norm_layer, dim: int) -> nn.Module:
    """A LayerNorm whose output meets fp32 activations (a residual, an addition, the fusion
    modules): ``norm_layer(dim)``, by default nn.LayerNorm, whose output under autocast stays fp32."""
    return (norm_layer or nn.LayerNorm)(dim)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so Sequentials keep the published key indices."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p = 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"



def drop_path_schedule(rate: float, n: int) -> list[float]:
    """torch.linspace(0, rate, n) as floats, computed in Python (works under a meta device context)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
