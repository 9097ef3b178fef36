"""Triton helpers shared by the kernels of several ops, and the one way a kernel module defines its
kernels: on first use (importing Triton waits for the first launch; Triton also picks compiling or
interpreting when a kernel is defined), with the shared helpers in the module's globals, where
Triton finds them by name."""
from __future__ import annotations

from ._triton_env import fix_interpreter_index, interpreting

# triton.language, its constexpr and libdevice, bound by helpers()
tl = constexpr = libdevice = None


def _sigmoid(x, INTERP: constexpr):
    """1 / (1 + exp(-x)) in fp32 to about an ulp, as PyTorch computes it. tl.sigmoid is
    ex2.approx of the rounded x * log2(e) (|x| * 6e-8 relative error) and an approximate division:
    several ulp on every SiLU, which the whole-model tolerance test sums over many layers."""
    if INTERP:
        return 1.0 / (1.0 + tl.exp(-x))   # numpy's, correctly rounded
    else:
        # rcp.rn: the correctly rounded reciprocal, cheaper than div.rn (1 + e >= 1: no denormals)
        return libdevice.rcp_rn(1.0 + libdevice.exp(-x))


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


_NAMES = ("_sigmoid", "_round_bf16", "_tile")
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
            for name in _NAMES:
                _built[name] = triton.jit(own[name])
        g["tl"], g["constexpr"] = triton.language, triton.language.constexpr
        g.update(_built)
        for name in names:
            g[name] = triton.jit(g[name])
            built[name] = g[name]
        if interpreting():
            fix_interpreter_index()
    return built
