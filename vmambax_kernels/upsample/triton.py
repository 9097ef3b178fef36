"""Triton backend of up2_bilinear: PyTorch's forward, a gathering backward.

Bilinear x2 with align_corners=False reads, along each axis, output row o from the source
coordinate o / 2 - 1/4 clamped at 0: out[2i] = in[i - 1] / 4 + 3 in[i] / 4 (out[0] = in[0]) and
out[2i + 1] = 3 in[i] / 4 + in[i + 1] / 4 (out[2n - 1] = in[n - 1]). Its adjoint gives input row i
the output rows 2i - 1 .. 2i + 2 with weights 1/4, 3/4, 3/4, 1/4, where the first row's 3/4 becomes 1
(and its 1/4 drops) and likewise the last row's; in 2-D the weights multiply. So each program
gathers the 16 taps of a tile of input positions and channels in fp32 and writes the gradient once:
no atomics (PyTorch's backward and Inductor's decomposition scatter each output gradient into four
inputs with atomic adds: ~8 ms of a compiled 512x512 training step on an H200, profile of aa6f50a).

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import torch

from .._triton_env import availability, interpreting  # noqa: F401  (backend API)
from .._triton_math import jit_module

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None


def _tap_weight(i, n, K: constexpr):
    """Weight of output row 2i - 1 + K for input row i of n (0 where that row is not read from i)."""
    if K == 0:
        w = tl.where(i >= 1, 0.25, 0.0)
    elif K == 1:
        w = tl.where(i >= 1, 0.75, 1.0)
    elif K == 2:
        w = tl.where(i < n - 1, 0.75, 1.0)
    else:
        w = tl.where(i < n - 1, 0.25, 0.0)
    return w


def _up2_bwd_kernel(g_ptr, dx_ptr, H, W, C, NP, sg_b, sg_h, sg_w, INTERP: constexpr, BP: constexpr,
                    BC: constexpr):
    """dx[b, i, j, c] for a tile of BP input positions (b, i, j flattened, j fastest) and BC channels;
    g (Bt, 2H, 2W, C) and dx (Bt, H, W, C) have unit channel stride, dx is contiguous."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    mp, mc = p < NP, cc < C
    j = p % W
    t = p // W
    i = t % H
    b = (t // H).to(tl.int64)
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for ky in tl.static_range(4):
        wy = _tap_weight(i, H, ky)
        row = g_ptr + b * sg_b + (2 * i - 1 + ky).to(tl.int64) * sg_h
        for kx in tl.static_range(4):
            w = wy * _tap_weight(j, W, kx)
            ok = mp & (w != 0.0)
            ptr = row + (2 * j - 1 + kx) * sg_w
            v = tl.load(ptr[:, None] + cc[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
            acc += w[:, None] * v.to(tl.float32)
    out = dx_ptr + p.to(tl.int64)[:, None] * C + cc[None, :]
    acc = _round_bf16(acc, dx_ptr, INTERP)  # the interpreter truncates to bf16; the GPU rounds
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mp[:, None] & mc[None, :])


_HELPERS = ("_tap_weight",)
_KERNELS = ("_up2_bwd_kernel",)
_built: dict = {}


def _kernels() -> dict:
    return jit_module(globals(), _HELPERS + _KERNELS, _built)


# Tiles of BP positions x BC channels. bench_up2.py --sweep swept only its first case (expand1, the
# smallest; H200, bf16, eccf39e): BP 16 / 32 / 64 / 128 took 0.0086 / 0.0092 / 0.0162 / 0.0146 ms.
# 32 stays until the large maps (final_a, final_b: most of the time) are swept too.
BP = 32


def _channel_block(C: int) -> int:
    """The largest power of two up to 64 that divides C (no masked-off lanes: 32 for the model's 96
    channels, 64 for 192 and 384), else the power of two that covers C, up to 64."""
    low = C & -C
    return min(64, low) if low >= 16 else min(64, 1 << (C - 1).bit_length())


def _backward(g: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """dx (Bt, H, W, C) contiguous, in g's dtype, from g (Bt, 2H, 2W, C)."""
    g = g if g.stride(-1) == 1 else g.contiguous()
    Bt, _, _, C = g.shape
    dx = torch.empty((Bt, H, W, C), dtype=g.dtype, device=g.device)
    if dx.numel():
        bc = _channel_block(C)
        grid = (-(-Bt * H * W // BP), -(-C // bc))  # ceil divisions
        _kernels()["_up2_bwd_kernel"][grid](g, dx, H, W, C, Bt * H * W, *g.stride()[:3], INTERP=interpreting(),
                                            BP=BP, BC=bc, num_warps=4)
    return dx


# ----------------------------------------------------------------------------------------------
# torch.library op (the backward; torch.compile traces the autograd Function below into it)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::up2_bilinear_bwd_triton", mutates_args=())
def _bwd_op(g: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return _backward(g, H, W)


@_bwd_op.register_fake
def _(g, H, W):
    return g.new_empty((g.shape[0], H, W, g.shape[3]))


class _Up2Fn(torch.autograd.Function):
    """PyTorch's forward; the gathering backward (the registered op under torch.compile, the launch
    itself in eager mode, where the dispatcher's host time per call is not worth it)."""

    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[1], x.shape[2]
        return reference.up2_bilinear(x)

    @staticmethod
    def backward(ctx, g):
        H, W = ctx.hw
        return _bwd_op(g, H, W) if torch.compiler.is_compiling() else _backward(g, H, W)


def up2_bilinear(x: torch.Tensor) -> torch.Tensor:
    """Backend entry (x validated by the public ``up2_bilinear``): (Bt, 2H, 2W, C). float64 runs the
    reference."""
    if x.dtype not in _DTYPES:
        return reference.up2_bilinear(x)
    return _Up2Fn.apply(x)
