"""Triton backend of the fused depthwise conv + SiLU: one forward kernel, two backward kernels.

Notation: x (Bt, H, W, Dm) channels last, out = silu(a), a = bias + sum_d w_d x[. + d] over the
K x K taps d = (di, dj), |di|, |dj| <= P = (K - 1) // 2, zero outside the plane. Every kernel
works on tiles of BP consecutive positions q of the flattened (Bt, H, W) (several whole planes
when planes are small, e.g. 4 x 4 windows) by BC channels. Each tap is one masked [BP, BC] load,
coalesced along channels (the neighbours come from L1/L2).

  forward:  a is summed in fp32 and silu(a) is stored as [BC, BP] into out (Bt, Dm, H, W),
            coalesced along positions: Triton converts the layout through shared memory, so the
            transpose costs no pass.
  backward: (1) _dwconv_bwd_dz_kernel recomputes a on its tile as the forward does, stores
            dz = g silu'(a) in fp32 channels last (Bt, H, W, Dm) and adds db += sum_q dz[q],
            dw_d += sum_q dz[q] x[q + d] (the x taps, reloaded from L1/L2): one row of fp32 partial
            sums per tile, summed on the host in fp64 (deterministic, no atomics).
            (2) _dwconv_bwd_dx_kernel: dx[q] = sum_d w_d dz[q - d], a stencil over the dz
            buffer, stored channels last in x's dtype. The buffer costs one fp32 write and
            one read of Bt L Dm values; in exchange neither kernel needs a halo window, a
            scratch copy or a barrier (the single fused kernel they replace held 255 registers).

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import torch

from .._triton_env import availability, interpreting  # noqa: F401  (backend API)
from .._triton_math import jit_module

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None


def _preact(x_ptr, w_ptr, b_ptr, xrow, h, w, ok, c, mc, H, W, sx_h, sx_w, sw_c, sw_h, sw_w,
            HAS_BIAS: constexpr, K: constexpr, P: constexpr, BP: constexpr, BC: constexpr):
    """a = bias + sum_d w_d x[q + d] on a [BP, BC] tile, in fp32 (zero-padded plane)."""
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    for ki in range(K):   # a runtime loop over rows: all K K taps unrolled spilled (old bwd)
        okh = ok & (h + (ki - P) >= 0) & (h + (ki - P) < H)
        for kj in tl.static_range(K):
            okw = okh & (w + (kj - P) >= 0) & (w + (kj - P) < W)
            wv = tl.load(w_ptr + c * sw_c + ki * sw_h + kj * sw_w, mask=mc, other=0.0).to(tl.float32)
            xv = tl.load(xrow[:, None] + ((ki - P) * sx_h + (kj - P) * sx_w) + c[None, :],
                         mask=okw[:, None] & mc[None, :], other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, Dm, H, W, NQ, n_cb,
                       sx_b, sx_h, sx_w, sw_c, sw_h, sw_w,
                       HAS_BIAS: constexpr, EVEN: constexpr, INTERP: constexpr,
                       K: constexpr, P: constexpr, BP: constexpr, BC: constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb          # channel blocks of the same positions run side by side (DRAM rows)
    t = pid // n_cb
    c = cb * BC + tl.arange(0, BC)
    mc = c < Dm
    L = H * W
    b, p, ok = _tile(t, L, NQ, BP, EVEN)
    h = p // W
    w = p - h * W
    xrow = x_ptr + (b * sx_b + h * sx_h + w * sx_w)                 # [BP] pointers
    acc = _preact(x_ptr, w_ptr, b_ptr, xrow, h, w, ok, c, mc, H, W, sx_h, sx_w, sw_c, sw_h, sw_w,
                  HAS_BIAS, K, P, BP, BC)
    y = _round_bf16(tl.trans(acc * _sigmoid(acc, INTERP)), out_ptr, INTERP)  # [BC, BP]
    o = out_ptr + (b * Dm * L + p)                                       # out[b, 0, p]
    tl.store(o[None, :] + c[:, None] * L, y.to(out_ptr.dtype.element_ty), mask=mc[:, None] & ok[None, :])


def _dwconv_bwd_dz_kernel(g_ptr, x_ptr, w_ptr, b_ptr, dz_ptr, dwp_ptr, dbp_ptr,
                          Dm, H, W, NQ, n_cb, sg_b, sg_c,
                          sx_b, sx_h, sx_w, sw_c, sw_h, sw_w,
                          HAS_BIAS: constexpr, EVEN: constexpr, INTERP: constexpr, K: constexpr,
                          P: constexpr, KKP: constexpr, BP: constexpr, BC: constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    c = cb * BC + tl.arange(0, BC)
    mc = c < Dm
    L = H * W
    kk = tl.arange(0, KKP)
    dw = tl.zeros((KKP, BC), dtype=tl.float32)     # this tile's partial sums
    b, p, ok = _tile(t, L, NQ, BP, EVEN)
    h = p // W
    w = p - h * W
    xrow = x_ptr + (b * sx_b + h * sx_h + w * sx_w)
    a = _preact(x_ptr, w_ptr, b_ptr, xrow, h, w, ok, c, mc, H, W, sx_h, sx_w, sw_c, sw_h, sw_w,
                HAS_BIAS, K, P, BP, BC)
    m = ok[:, None] & mc[None, :]
    # g (Bt, Dm, H, W) with a packed plane (the launcher ensures it): g[b, c, p]
    gv = tl.load(g_ptr + (b * sg_b + p)[:, None] + c[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
    sg = _sigmoid(a, INTERP)
    dz = gv * (sg * (1.0 + a * (1.0 - sg)))    # 0 outside the tile: g is loaded as 0 there
    db = tl.sum(dz, axis=0)
    tl.store(dz_ptr + (b * L + p)[:, None] * Dm + c[None, :], dz, mask=m)
    for ki in range(K):
        okh = ok & (h + (ki - P) >= 0) & (h + (ki - P) < H)
        for kj in tl.static_range(K):
            okw = okh & (w + (kj - P) >= 0) & (w + (kj - P) < W)
            xv = tl.load(xrow[:, None] + ((ki - P) * sx_h + (kj - P) * sx_w) + c[None, :],
                         mask=okw[:, None] & mc[None, :], other=0.0).to(tl.float32)
            dw += tl.where(kk[:, None] == ki * K + kj, tl.sum(xv * dz, axis=0)[None, :], 0.0)
    prow = t.to(tl.int64) * Dm
    tl.store(dwp_ptr + (prow + c[None, :]) * (K * K) + kk[:, None], dw,
             mask=(kk[:, None] < K * K) & mc[None, :])
    tl.store(dbp_ptr + prow + c, db, mask=mc)


def _dwconv_bwd_dx_kernel(dz_ptr, w_ptr, dx_ptr, Dm, H, W, NQ, n_cb, sw_c, sw_h, sw_w,
                          EVEN: constexpr, INTERP: constexpr, K: constexpr, P: constexpr,
                          BP: constexpr, BC: constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    c = cb * BC + tl.arange(0, BC)
    mc = c < Dm
    L = H * W
    b, p, ok = _tile(t, L, NQ, BP, EVEN)
    h = p // W
    w = p - h * W
    row = (b * L + p) * Dm                          # [BP] offsets of dz[q, 0] and dx[q, 0]
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for ki in range(K):
        okh = ok & (h - (ki - P) >= 0) & (h - (ki - P) < H)
        for kj in tl.static_range(K):
            # dz[q - d], d = (ki - P, kj - P), inside the same plane
            okw = okh & (w - (kj - P) >= 0) & (w - (kj - P) < W)
            wv = tl.load(w_ptr + c * sw_c + ki * sw_h + kj * sw_w, mask=mc, other=0.0).to(tl.float32)
            gd = tl.load(dz_ptr + row[:, None] - ((ki - P) * W + (kj - P)) * Dm + c[None, :],
                         mask=okw[:, None] & mc[None, :], other=0.0)
            acc += gd * wv[None, :]
    acc = _round_bf16(acc, dx_ptr, INTERP)
    tl.store(dx_ptr + row[:, None] + c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=ok[:, None] & mc[None, :])


_HELPERS = ("_preact",)
_KERNELS = ("_dwconv_fwd_kernel", "_dwconv_bwd_dz_kernel", "_dwconv_bwd_dx_kernel")
_built: dict = {}


def _kernels() -> dict:
    return jit_module(globals(), _HELPERS + _KERNELS, _built)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Registers from benchmarks/compile_offline.py (sm_90, Triton 3.6, bf16), first written for 8 warps.
# fwd: a [BP, BC] = 128 x 32 tile over 8 warps (16 values per thread): 88 registers (103 when
# tiles cross planes); 4 warps take 148-168 and are faster all the same (below). 32 bf16 channels
# are 64 contiguous bytes per position, 128 positions 256 contiguous output bytes per channel when a
# tile lies in one plane.
# bwd_dz, bwd_dx: 64 x 32 tiles over 8 warps (8 values per thread), K = 3: dz 75-80 registers,
# dx 63-72, no spills (K = 7 with 16 channels: dz 64 and 8 B of stack). 128 x 32 took 105-120
# (dz) and 100-109 (dx); a persistent dz kernel looping over tiles with dw in registers took
# 180-255 (bwd_dz without its loop: 105-120), hence one partial row per tile: at enc1 2048 rows x
# 192 x 9 fp32 (14 MB, against the dz buffer's 2 x 100 MB).
# Timed (H100, bf16, `bench_dwconv.py --sweep` at enc1, 2026-11-27): 4 warps beat 8 in all three
# kernels, fwd 0.126 -> 0.085 ms; the whole backward (both kernels) 0.650 -> 0.480 with bwd_dz on 4
# warps (BP 128 instead: 0.488), -> 0.467 with bwd_dx too. With 4 warps, at dcim_inner1 / enc4:
# fwd 0.194 / 0.017 ms, bwd 0.499 / 0.126 ms (8 warps, an earlier run: 0.220 / 0.021, 0.660 / 0.269).
_DEFAULTS = {"fwd": dict(BP=128, BC=32, num_warps=4),
             "bwd_dz": dict(BP=64, BC=32, num_warps=4),
             "bwd_dx": dict(BP=64, BC=32, num_warps=4)}
CONFIG_OVERRIDE: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(kind, Dm, K):
    o = {**_DEFAULTS[kind], **CONFIG_OVERRIDE.get(kind, {})}
    bc = max(1, min(o["BC"], _pow2(Dm)))
    return {**o, "BC": bc, "n_cb": -(-Dm // bc), "P": (K - 1) // 2}


def _forward(x, weight, bias):
    k = _kernels()
    Bt, H, W, Dm = x.shape
    K = weight.shape[-1]
    L = H * W
    cfg = _config("fwd", Dm, K)
    bp = cfg["BP"]
    out = torch.empty((Bt, Dm, H, W), dtype=x.dtype, device=x.device)
    n_tiles = -(-Bt * L // bp)
    k["_dwconv_fwd_kernel"][(n_tiles * cfg["n_cb"],)](
        x, weight, bias, out, Dm, H, W, Bt * L, cfg["n_cb"],
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(2), weight.stride(3),
        HAS_BIAS=bias is not None, EVEN=L % bp == 0, INTERP=interpreting(), K=K, P=cfg["P"],
        BP=bp, BC=cfg["BC"], num_warps=cfg["num_warps"])
    return out


def _packed_plane(g):
    """g (Bt, Dm, H, W) with g[b, c, h, w] at b sg_b + c sg_c + h W + w (what the dz kernel reads)."""
    _, _, H, W = g.shape
    return (W == 1 or g.stride(3) == 1) and (H == 1 or g.stride(2) == W)


def _backward(g, x, weight, bias):
    """(dx (Bt, H, W, Dm) contiguous in x's dtype, dweight, dbias in the parameters' dtypes;
    dbias in weight's dtype when there is no bias)."""
    k = _kernels()
    Bt, H, W, Dm = x.shape
    K = weight.shape[-1]
    L, NQ = H * W, Bt * H * W
    dev = x.device
    # autograd's g is contiguous (Bt, Dm, H, W) in SS2D; another layout is copied once
    g = g if _packed_plane(g) else g.contiguous()
    c1 = _config("bwd_dz", Dm, K)
    n_tiles = -(-NQ // c1["BP"])
    dz = torch.empty((Bt, H, W, Dm), dtype=torch.float32, device=dev)
    dwp = torch.empty((n_tiles, Dm, K * K), dtype=torch.float32, device=dev)   # one row per tile
    dbp = torch.empty((n_tiles, Dm), dtype=torch.float32, device=dev)
    k["_dwconv_bwd_dz_kernel"][(n_tiles * c1["n_cb"],)](
        g, x, weight, bias, dz, dwp, dbp, Dm, H, W, NQ, c1["n_cb"],
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(2), weight.stride(3),
        HAS_BIAS=bias is not None, EVEN=L % c1["BP"] == 0, INTERP=interpreting(), K=K, P=c1["P"],
        KKP=_pow2(K * K),
        BP=c1["BP"], BC=c1["BC"], num_warps=c1["num_warps"])
    c2 = _config("bwd_dx", Dm, K)
    dx = torch.empty((Bt, H, W, Dm), dtype=x.dtype, device=dev)
    k["_dwconv_bwd_dx_kernel"][(-(-NQ // c2["BP"]) * c2["n_cb"],)](
        dz, weight, dx, Dm, H, W, NQ, c2["n_cb"], weight.stride(0), weight.stride(2), weight.stride(3),
        EVEN=L % c2["BP"] == 0, INTERP=interpreting(), K=K, P=c2["P"], BP=c2["BP"], BC=c2["BC"],
        num_warps=c2["num_warps"])
    dw = dwp.sum(0, dtype=torch.float64).view(weight.shape).to(weight.dtype)
    db = dbp.sum(0, dtype=torch.float64).to(weight.dtype if bias is None else bias.dtype)
    return dx, dw, db


def _prepare(x, bias):
    # the kernels read channels with stride 1 (coalesced, vectorised); anything else is rare: copy
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x, None if bias is None else bias.contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::dwconv_silu_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x, bias = _prepare(x, bias)
    return _forward(x, weight, bias)


@_fwd_op.register_fake
def _(x, weight, bias):
    Bt, H, W, Dm = x.shape
    return x.new_empty((Bt, Dm, H, W))


@torch.library.custom_op("vmambax::dwconv_silu_triton_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, bias = _prepare(x, bias)
    return _backward(g, x, weight, bias)


@_bwd_op.register_fake
def _(g, x, weight, bias):
    Dm = x.shape[-1]
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((Dm,), dtype=weight.dtype if bias is None else bias.dtype))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None


def _backward_rule(ctx, g):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _bwd_op(g, x, weight, bias)
    return dx, dw, db if ctx.has_bias else None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


class _EagerFn(torch.autograd.Function):
    """The same kernels as the ops above, for eager mode: torch.library's custom-op dispatch
    costs host time on every call (benchmarks/NOTES.md, "CGM kernel"), and SS2D calls this once
    per block. torch.compile traces the registered ops instead."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x, bias = _prepare(x, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _backward(g, x, weight, bias)
        return dx, dw, db if ctx.has_bias else None


def dwconv_silu(x, weight, bias=None):
    """Backend entry (arguments already validated by the public ``dwconv_silu``): (Bt, Dm, H, W).

    float32/bfloat16/float16 tensors run the kernels (math in fp32); float64 anywhere runs the
    reference, since the kernels compute in fp32. Differentiable in x, weight and bias.
    """
    if any(t is not None and t.dtype not in _DTYPES for t in (x, weight, bias)):
        return reference.dwconv_silu(x, weight, bias)
    if torch.compiler.is_compiling():
        return _fwd_op(x, weight, bias)
    return _EagerFn.apply(x, weight, bias)
