"""Public four-direction 2D selective scan: validation, backend choice, the reference as a custom op.

Layering (flash-attention's): backend kernels -> torch.library custom ops with fake implementations
-> autograd -> these public functions, whose docstrings give every shape.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, _checks
from . import reference
from .flops import register_scan_flops


# The reference is registered as a custom op too, so flop counting, opcheck and torch.compile
# see one scan op whatever the backend. Its backward differentiates the reference itself.
@torch.library.custom_op("vmambax::selective_scan_2d_ref", mutates_args=())
def _ref_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
            out_dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return reference.selective_scan_2d_fast(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype)


@_ref_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    return u.new_empty(u.shape, dtype=out_dtype)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of a new tensor of its shape (the fake's ``new_empty``): ``contiguous()``
    alone keeps whatever strides size-1 dimensions had, as is_contiguous() ignores them."""
    if t.stride() != torch.empty(t.shape, device="meta").stride():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


@contextlib.contextmanager
def _autograd_dispatch():
    """Grad mode with autograd's dispatch keys back on: a custom op's body runs below autograd (the
    keys are excluded), where grad mode alone records nothing, and the backward differentiates the
    reference with autograd."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


# The reference's backward is an op of its own for the same reason: traced into a compiled
# backward graph, its loop over L unrolled (compiling a small model with Inductor ran past 4
# minutes on an H100); as one op, the graph holds one call.
@torch.library.custom_op("vmambax::selective_scan_2d_ref_bwd", mutates_args=())
def _ref_bwd_op(grad: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (du, d delta, dA, dB, dC, dD, d delta_bias) of the reference, each in its input's
    dtype and contiguous; empty (0,) in A's dtype for an absent D or delta_bias."""
    inputs = (u, delta, A, B, C, D, delta_bias)
    with _autograd_dispatch():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        y = reference.selective_scan_2d_fast(*leaves, delta_softplus, out_dtype)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], grad))
    # Contiguous, so the strides are the same under fake tensors and real ones: the gradient of a
    # non-contiguous input (B, C are split views of x_proj's output) came back with strides that
    # differed between the two, and the compiled backward's `view` of it failed (aot_eager).
    # Each in a storage of its own: a sum over size-1 dimensions is a view (with Bt = H = W = 1,
    # d delta_bias came back as a view of d delta), and an op's outputs may not alias.
    taken, out = {t.untyped_storage().data_ptr() for t in (grad, *inputs) if t is not None and t.numel()}, []
    for t in inputs:
        g = A.new_empty(0) if t is None else _dense(next(grads))
        if g.numel() and g.untyped_storage().data_ptr() in taken:
            g = g.clone()
        taken.add(g.untyped_storage().data_ptr())
        out.append(g)
    return tuple(out)


@_ref_bwd_op.register_fake
def _(grad, u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    return tuple(A.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, delta_bias))


def _ref_setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs[:7]])
    ctx.flags = inputs[7:]


def _ref_backward(ctx, grad):
    saved = ctx.saved_tensors
    grads = _ref_bwd_op(grad, *saved, *ctx.flags)
    return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad[:7])], None, None)


_ref_op.register_autograd(_ref_backward, setup_context=_ref_setup)
register_scan_flops(torch.ops.vmambax.selective_scan_2d_ref)


def _run(mod, lowrank: bool, *args):
    if mod is not reference:
        return (mod.selective_scan_2d_lowrank if lowrank else mod.selective_scan_2d)(*args)
    if lowrank:  # the reference forms delta explicitly, in fp32; fast backends fuse it
        u, dt, w, A, B, C, *tail = args
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        args = (u.to(ct), reference.lowrank_delta(dt.to(ct), w.to(ct)), A, B.to(ct), C.to(ct), *tail)
    return _ref_op(*args)


def selective_scan_2d(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, *,
                      out_dtype=torch.float32, backend=None):
    """Four-direction 2D selective scan (VMamba's SS2D core: cross-scan, S6 scan, cross-merge).

    Args:
        u: (Bt, Dm, H, W) float32 | bfloat16 | float16.
        delta: (Bt, 4, Dm, H, W), dtype of u. Step sizes before ``delta_bias``/softplus.
        A: (4, Dm, N) float32, 1 <= N <= 64 (negative in practice: -exp(A_log)).
        B, C: (Bt, 4, N, H, W), dtype of u.
        D, delta_bias: (4, Dm) float32 or None.
        delta_softplus: apply softplus to delta + delta_bias.
        out_dtype: dtype of the result (state and sums are always float32).
        backend: None (auto: $VMAMBAX_BACKEND, then cuda, triton, reference) | "cuda" | "triton" | "reference".

    Walk k = 0 row-major, 1 column-major, 2 and 3 the same reversed; the result is the sum of the four
    walks' outputs at each position: y (Bt, Dm, H, W). Differentiable in every tensor argument.
    """
    _, device = _checks.selective_scan_2d_args(u, delta, A, B, C, D, delta_bias, out_dtype)
    mod = _backend.resolve("selective_scan_2d", backend, device)
    return _run(mod, False, u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_dtype)


def cross_selective_scan_2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, backend=None):
    """SS2D core with VMamba's parameter layout (SPEC.md section 1, module form).

    Args:
        x: (Bt, Dm, H, W), the activations after the depthwise conv and SiLU.
        x_proj_weight: (4, R + 2N, Dm); dt_projs_weight: (4, Dm, R); dt_projs_bias: (4, Dm);
        A_logs: (4*Dm, N); Ds: (4*Dm,).
    Returns y (Bt, Dm, H, W) float32 (float64 when x and A_logs are float64, for gradcheck).
    Differentiable in x and every parameter.
    Fast backends take the low-rank dt (Bt, 4, R, H, W) into the kernel and never form the full delta.
    """
    Bt, Dm, H, W, N, R = _checks.cross_selective_scan_2d_args(
        x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    mod = _backend.resolve("selective_scan_2d", backend, x.device)
    dt, B, C = reference.project(x, x_proj_weight, R, N)     # (Bt, 4, R|N|N, H, W), autocast dtype
    u = x.to(dt.dtype)
    pt = torch.float64 if A_logs.dtype == torch.float64 and x.dtype == torch.float64 else torch.float32
    A = -torch.exp(A_logs.to(pt)).view(4, Dm, N)
    return _run(mod, True, u, dt, dt_projs_weight.to(pt), A, B, C, Ds.to(pt).view(4, Dm),
                dt_projs_bias.to(pt), True, pt)
