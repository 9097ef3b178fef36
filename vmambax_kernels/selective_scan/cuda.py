"""CUDA backend of the four-direction 2D selective scan (the fused kernels in csrc/selective_scan).

Layering: C++ ops ``torch.ops.vmambax.ss2d_cuda_fwd`` / ``ss2d_lowrank_cuda_fwd`` / ``ss2d_cuda_bwd``
(registered by the extension ``vmambax_kernels._C``) -> fake implementations and autograd (here)
-> ``selective_scan_2d`` / ``selective_scan_2d_lowrank`` (the backend contract of ``_backend``).

Forward (csrc/selective_scan/ss2d_fwd_kernel.cuh): threads over channels, chunks of T = 64
positions, chunk carries by a chunk pass and a carry pass, then one output pass over both sides (row
walks into the fp32 buffer in the original layout, column walks into a transient fp32 buffer in
their transposed layout, both coalesced) and a tiled transpose-add into the output dtype; saves,
when a gradient is needed, only the fp32 state entering each chunk (``_states_shape``). Backward
(ss2d_bwd_kernel.cuh): a reverse chunk pass and carry pass, then one pass per side that replays each
chunk from its saved state and forms every gradient. The low-rank form takes dt (Bt, 4, R, H, W) and
forms delta inside the kernel in fp32: neither the full delta nor its gradient is ever materialised.
The forward is deterministic. The backward's cross-block sums are atomics into float64 buffers
(dA, dD, d delta_bias, dW always; dB, dC and the low-rank d dt for fp32 inputs), rounded to fp32 once
by the op: the fp32 backward is deterministic in practice (barring a near-tie at that rounding); with
bf16 / fp16 inputs dB, dC and d dt are fp32 atomics, not bitwise deterministic.
"""
from __future__ import annotations

import torch

from .flops import register_scan_flops

try:
    from .. import _C  # noqa: F401  (registers torch.ops.vmambax.ss2d_*)
    _IMPORT_ERROR = None
except ImportError as exc:  # extension not built: say how, when the backend is asked for
    _IMPORT_ERROR = exc

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability() -> str | None:
    if _IMPORT_ERROR is not None:
        return ("the CUDA extension vmambax_kernels._C is not built (" + str(_IMPORT_ERROR).split("\n")[0]
                + "); build it on a machine with nvcc and a CUDA build of torch: "
                  "VMAMBAX_FORCE_BUILD=1 pip install --no-build-isolation -e .")
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


CHUNK = 64  # csrc/selective_scan/ss2d.h:kChunk


def _states_shape(u, N):
    """(Bt, 4, nc, N, Dm): the state entering each chunk of each walk; nc = 0 when a walk is one chunk."""
    Bt, Dm, H, W = u.shape
    nc = (H * W + CHUNK - 1) // CHUNK  # integer arithmetic: H*W may be a SymInt under torch.compile
    return (Bt, 4, nc if nc > 1 else 0, N, Dm)


if _IMPORT_ERROR is None:
    _fwd = torch.ops.vmambax.ss2d_cuda_fwd
    _fwd_lr = torch.ops.vmambax.ss2d_lowrank_cuda_fwd
    _bwd = torch.ops.vmambax.ss2d_cuda_bwd

    def _fake_out(u, A, out_dtype, save):
        shape = _states_shape(u, A.shape[-1]) if save else (0,)
        return u.new_empty(u.shape, dtype=out_dtype), u.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("vmambax::ss2d_cuda_fwd")
    def _(u, dl, A, B, C, D, delta_bias, delta_softplus, out_dtype, save_states):
        return _fake_out(u, A, out_dtype, save_states)

    @torch.library.register_fake("vmambax::ss2d_lowrank_cuda_fwd")
    def _(u, dt, A, B, C, D, delta_bias, dt_projs_weight, delta_softplus, out_dtype, save_states):
        return _fake_out(u, A, out_dtype, save_states)

    @torch.library.register_fake("vmambax::ss2d_cuda_bwd")
    def _(dy, u, dl, A, B, C, D, delta_bias, dt_projs_weight, states, delta_softplus):
        f32 = dict(dtype=torch.float32)
        return [u.new_empty(u.shape, **f32), dl.new_empty(dl.shape, **f32), A.new_empty(A.shape, **f32),
                B.new_empty(B.shape, **f32), C.new_empty(C.shape, **f32),
                A.new_empty(D.shape if D is not None else (0,), **f32),
                A.new_empty(delta_bias.shape if delta_bias is not None else (0,), **f32),
                A.new_empty(dt_projs_weight.shape if dt_projs_weight is not None else (0,), **f32)]

    def _setup(ctx, inputs, output):
        # inputs: every schema argument, 10 full-rank, 11 low-rank
        lowrank = len(inputs) == 11
        u, dl, A, B, C, D, bias = inputs[:7]
        W = inputs[7] if lowrank else None
        ctx.softplus = inputs[8] if lowrank else inputs[7]
        ctx.lowrank = lowrank
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(u, dl, A, B, C, D, bias, W, output[1])

    def _backward(ctx, gy, _gstates):
        u, dl, A, B, C, D, bias, W, states = ctx.saved_tensors
        if states.dim() != 5:
            raise RuntimeError("ss2d_cuda backward: the forward ran with save_states=False "
                               "(under no_grad or without inputs requiring grad); rerun it with grad enabled")
        g = _bwd(gy.float().contiguous(), u, dl, A, B, C, D, bias, W, states, ctx.softplus)
        du, ddl, dA, dB, dC, dD, dbias, dW = g
        grads = [du.to(u.dtype), ddl.to(dl.dtype), dA, dB.to(B.dtype), dC.to(C.dtype),
                 dD if D is not None else None, dbias if bias is not None else None]
        if ctx.lowrank:  # + softplus, out_dtype, save_states
            return (*grads, dW, None, None, None)
        return (*grads, None, None, None)

    torch.library.register_autograd("vmambax::ss2d_cuda_fwd", _backward, setup_context=_setup)
    torch.library.register_autograd("vmambax::ss2d_lowrank_cuda_fwd", _backward, setup_context=_setup)
    register_scan_flops(_fwd, lowrank=False)
    register_scan_flops(_fwd_lr, lowrank=True)


def _prepare(u, dl, dl_name, B, C, A, D, delta_bias, W, out_dtype):
    """Backend-level checks the public validation leaves open (the kernels take fp32/bf16/fp16
    activations and fp32 parameters); dense H*W planes are required, outer strides are free."""
    for name, t in (("u", u), (dl_name, dl), ("B", B), ("C", C)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: the cuda backend expects float32, bfloat16 or float16, got {t.dtype}")
    if out_dtype not in _DTYPES:
        raise TypeError(f"out_dtype: the cuda backend expects float32, bfloat16 or float16, got {out_dtype}")

    def plane(t):  # a view with a strided plane (rare) is copied: the kernels walk dense planes
        H, W_ = t.shape[-2:]
        ok = t.stride(-1) == 1 and (H == 1 or t.stride(-2) == W_)
        return t if ok else t.contiguous()

    def param(t):
        return None if t is None else t.float().contiguous()

    return plane(u), plane(dl), plane(B), plane(C), param(A), param(D), param(delta_bias), param(W)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def selective_scan_2d(u, delta, A, B, C, D, delta_bias, delta_softplus: bool, out_dtype):
    """y (Bt, Dm, H, W) = the four-direction scan (SPEC.md section 1), fused forward and backward."""
    why = availability()
    if why:
        raise RuntimeError(f"selective_scan_2d: the cuda backend cannot run: {why}")
    u, delta, B, C, A, D, delta_bias, _ = _prepare(u, delta, "delta", B, C, A, D, delta_bias, None, out_dtype)
    save = _needs_grad(u, delta, A, B, C, D, delta_bias)
    y, _ = _fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_dtype, save)
    return y


def selective_scan_2d_lowrank(u, dt, dt_projs_weight, A, B, C, D, delta_bias, delta_softplus: bool, out_dtype):
    """As ``selective_scan_2d`` with delta[b,k,d] = dt_projs_weight[k,d,:] @ dt[b,k,:] formed in the
    kernel (fp32); dt (Bt, 4, R, H, W) may be a view with free outer strides (a split of x_dbl)."""
    why = availability()
    if why:
        raise RuntimeError(f"selective_scan_2d_lowrank: the cuda backend cannot run: {why}")
    u, dt, B, C, A, D, delta_bias, W = _prepare(u, dt, "dt", B, C, A, D, delta_bias, dt_projs_weight, out_dtype)
    save = _needs_grad(u, dt, A, B, C, D, delta_bias, W)
    y, _ = _fwd_lr(u, dt, A, B, C, D, delta_bias, W, bool(delta_softplus), out_dtype, save)
    return y
