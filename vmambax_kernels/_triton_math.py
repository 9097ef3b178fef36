"""Triton helpers shared by the kernels of several ops, and the one way a kernel module defines its
kernels: on first use (importing Triton waits for the first launch; Triton also picks compiling or
interpreting when a kernel is defined), with the shared helpers in the module's globals, where
Triton finds them by name."""
from __future__ import annotations

from ._triton_env import interpreting, patch_interpreter

# triton.language, its constexpr and libdevice, bound by helpers()
tl = constexpr = libdevice = None


def _sigmoid(x, INTERP: constexpr):
    """1 / (1 + exp(-x)) in fp32 to about an ulp, as PyTorch computes it. tl.sigmoid is
    ex2.approx of the rounded x * log2(e) (|x| * 6e-8 relative error) and an approximate division:
    several ulp on every SiLU, which the whole-model tolerance test sums over many layers."""
    if INTERP:
        return 1.0 / (1.0 + tl.exp(-x))   # numpy's, correctly rounded
    else:
        # exp's argument capped at 88 (e^88 < FLT_MAX) keeps 1 + e finite for _rcp_rn; below
        # x = -87.3 the sigmoid is under 2^-126 and flushes to 0 either way (ftz, as rcp.rn.ftz)
        t = -x
        return _rcp_rn(1.0 + libdevice.exp(tl.where(t > 88.0, 88.0, t)))


def _rcp_rn(d):
    """1 / d correctly rounded for 1 <= d < 2^126 (0 for larger d): the fast path ptxas emits for
    rcp.rn.ftz.f32 (MUFU.RCP, one fma Newton step), without its range check and out-of-line slow
    path (zero, denormal, huge, inf, nan). libdevice.rcp_rn's per-element check, branch and CALL
    took norm_gate's enc1 backward from 128 to 160 registers (sm_90, compile_offline; 168 with
    div_rn): 3 of its 4 persistent programs per SM fit, our reading of 0.594 -> 0.94-0.95 ms.
    This sequence: 128, no CALL; enc1 backward 0.603 ms (H100, 156dbb7)."""
    return tl.inline_asm_elementwise(
        "{ .reg .f32 r, n, e; rcp.approx.ftz.f32 r, $1; neg.f32 n, $1; "
        "fma.rn.ftz.f32 e, n, r, 0f3F800000; fma.rn.ftz.f32 $0, r, e, r; }",
        "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1)


def _round_bf16(val, ptr, INTERP: constexpr):
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round to nearest even as the GPU does.
            bits = val.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            val = bits.to(tl.float32, bitcast=True)
    return val


def _tile(t, L, NQ, BP: constexpr, EVEN: constexpr):
    """Tile t of BP flattened positions of planes of L (NQ in all): plane b, in-plane position p,
    and which exist."""
    if EVEN:  # BP divides H W: one plane, contiguous positions (vectorised loads and stores)
        q0 = t * BP
        b = q0 // L
        p = tl.multiple_of(q0 - b * L, BP) + tl.arange(0, BP)
        ok = p < L
    else:
        q = t * BP + tl.arange(0, BP)
        b = q // L
        p = q - b * L
        ok = q < NQ
    return b.to(tl.int64), p, ok


_NAMES = ("_rcp_rn", "_sigmoid", "_round_bf16", "_tile")
_built: dict = {}


def jit_module(g: dict, names: tuple, built: dict) -> dict:
    """Once per kernel module: bind ``tl``/``constexpr`` and the shared helpers in its globals ``g``,
    jit ``names`` there (its helpers first: kernels find them by global name) and record them in
    ``built``, which is returned."""
    if not built:
        import triton
        import triton.language
        if not _built:
            from triton.language.extra import libdevice as _libdevice
            own = globals()
            own["tl"], own["constexpr"], own["libdevice"] = triton.language, triton.language.constexpr, _libdevice
            for name in _NAMES:   # in order: _sigmoid finds the jitted _rcp_rn by name
                own[name] = _built[name] = triton.jit(own[name])
        g["tl"], g["constexpr"] = triton.language, triton.language.constexpr
        g.update(_built)
        for name in names:
            g[name] = triton.jit(g[name])
            built[name] = g[name]
        if interpreting():
            patch_interpreter()
    return built
