"""Triton backend of layer_norm: norm_gate's kernels with the gate off (norm_gate/triton.py), one
launch each way, the fp32 result rounded once to out_dtype.

The kernels address every tensor as (plane b, position p, channel c). x (..., C) becomes such a
view without a copy when its leading dimensions merge into one (rows at any stride: B rows, L = 1)
or, failing that, all but the first do (B planes of L positions: a channels-first map permuted to
channels last, as DCIM's coarse map reaches its LayerNorm); anything else is copied once. The
output gradient takes the same view (or is copied), dx is written in x's layout.

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch

from .._triton_env import availability  # noqa: F401  (backend API)
from ..norm_gate import triton as kernels

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels' in-plane offsets (p * stride + c * stride) are int32; only the plane index is int64.
_INT32 = 2 ** 31


def _mergeable(t, lo: int, hi: int) -> bool:
    """Whether dimensions lo..hi-1 of t are one strided run, i.e. view as one dimension (decided
    from the strides rather than by trying: a failed view raises a different error on fake tensors)."""
    dims = [d for d in range(lo, hi) if t.shape[d] != 1]
    return all(t.stride(a) == t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:]))


def _fits(v) -> bool:
    _, L, C = v.shape
    return (L - 1) * v.stride(1) + (C - 1) * v.stride(2) < _INT32


def _planes(x):
    """x (..., C) as (B, L, C): rows (L = 1), else planes along the first dimension, else a copy."""
    C, n = x.shape[-1], x.dim()
    if not x.numel():
        return x.new_empty((0, 1, C))
    for lo, shape in ((0, (-1, 1, C)), (1, (x.shape[0], -1, C))):
        if _mergeable(x, lo, n - 1) and _fits(x.view(shape)):
            return x.view(shape)
    return x.contiguous().view(-1, 1, C)


def _like_planes(g, x3):
    """g (x's shape) as a view of x3's shape (B, L, C), else a contiguous copy of it."""
    n = g.dim()
    if _mergeable(g, 0, n - 1) or (g.shape[0] == x3.shape[0] and _mergeable(g, 1, n - 1)):
        if _fits(g.view(x3.shape)):
            return g.view(x3.shape)
    return g.contiguous().view(x3.shape)


def _forward(x, weight, bias, eps, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)   # row-major over (b, p)
    rstd = torch.empty_like(mean)
    if x.numel():
        x3 = _planes(x)
        kernels._launch_fwd(x3, None, weight, bias, out.view(x3.shape), mean, rstd, eps)
    return out, mean, rstd


def _backward(g, x, weight, mean, rstd):
    x3 = _planes(x)
    dx3 = torch.empty_like(x3)   # x's layout where _planes viewed x in place, else contiguous
    if not x.numel():
        zeros = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
        return dx3.view(x.shape), zeros, zeros.clone()
    dw, db = kernels._launch_bwd(_like_planes(g, x3), x3, None, weight, None, mean, rstd, dx3, None)
    return dx3.view(x.shape), dw.sum(0), db.sum(0)


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::layer_norm_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, eps, out_dtype)


@_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("vmambax::layer_norm_triton_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(g, x, weight, mean, rstd)


@_bwd_op.register_fake
def _(g, x, weight, mean, rstd):
    C = x.shape[-1]
    dx = torch.empty_like(_planes(x)).view(x.shape)   # as _backward allocates it
    return dx, weight.new_empty((C,), dtype=torch.float32), weight.new_empty((C,), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, _bias, _eps, _out_dtype = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])


def _backward_rule(ctx, g, _g_mean, _g_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    # torch.library passes zeros for an unused output; None only reaches here if that changes
    g = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if g is None else g
    return (*_bwd_op(g, x, weight, mean, rstd), None, None)


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


class _EagerFn(torch.autograd.Function):
    """The same kernels as the ops above, for eager mode (torch.library's dispatch costs host time
    on every call; the model has 52 of these LayerNorms). torch.compile traces the ops instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        out, mean, rstd = _forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd = ctx.saved_tensors
        return (*_backward(g, x, weight, mean, rstd), None, None)


def layer_norm(x, weight, bias, eps, out_dtype):
    """Backend entry (arguments already validated by the public ``layer_norm``): out (..., C).

    float32/bfloat16/float16 tensors and out_dtype run the kernels (math in fp32); float64
    anywhere runs the reference. A None weight (bias) is a ones (zeros) vector that needs no
    gradient. Differentiable in x, weight and bias.
    """
    if out_dtype not in _DTYPES or any(t is not None and t.dtype not in _DTYPES for t in (x, weight, bias)):
        return reference.layer_norm(x, weight, bias, eps, out_dtype)
    C = x.shape[-1]
    weight = x.new_ones(C, dtype=torch.float32) if weight is None else weight
    bias = x.new_zeros(C, dtype=torch.float32) if bias is None else bias
    if torch.compiler.is_compiling():
        return _fwd_op(x, weight, bias, float(eps), out_dtype)[0]
    return _EagerFn.apply(x, weight, bias, float(eps), out_dtype)
