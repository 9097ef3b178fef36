"""Triton helpers shared by the kernels of several ops, jitted on first use (importing Triton waits
for the first launch, as in every kernel module here). A kernel module calls ``helpers()`` in its
own ``_kernels()`` and puts the result in its globals, where Triton finds them by name."""
from __future__ import annotations

# triton.language, its constexpr and libdevice, bound by helpers()
tl = constexpr = libdevice = None


def _sigmoid(x, INTERP: constexpr):
    """1 / (1 + exp(-x)) in fp32 to about an ulp, as PyTorch computes it. tl.sigmoid is
    ex2.approx of the rounded x * log2(e) (|x| * 6e-8 relative error) and an approximate division:
    several ulp on every SiLU, which the whole-model tolerance test sums over many layers."""
    if INTERP:
        e = tl.exp(-x)   # numpy's
    else:
        e = libdevice.exp(-x)
    return tl.div_rn(1.0, 1.0 + e)


def _round_bf16(val, ptr, INTERP: constexpr):
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round to nearest even as the GPU does.
            bits = val.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            val = bits.to(tl.float32, bitcast=True)
    return val

_NAMES = ("_sigmoid", "_round_bf16")
_built: dict = {}


def helpers() -> dict:
    """{name: jitted helper}, for a kernel module's globals."""
    if not _built:
        import triton
        import triton.language
        from triton.language.extra import libdevice as _libdevice
        g = globals()
        g["tl"], g["constexpr"], g["libdevice"] = triton.language, triton.language.constexpr, _libdevice
        for name in _NAMES:
            _built[name] = triton.jit(g[name])
    return _built
