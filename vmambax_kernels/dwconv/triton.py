"""Triton backend of the fused depthwise conv + SiLU: one forward and one backward kernel.

Notation: x (Bt, H, W, Dm) channels last, out = silu(a), a = bias + sum_d w_d x[. + d] over the
K x K taps d = (di, dj), |di|, |dj| <= P = (K - 1) // 2, zero outside the plane. A program owns a
block of BC channels and a tile of positions:

  forward:  BP consecutive positions q of the flattened (Bt, H, W) (several whole planes when
            planes are small, e.g. 4 x 4 windows). Each tap is one masked [BP, BC] load of x,
            coalesced along channels (the neighbours come from L1/L2); a is summed in fp32 and
            silu(a) is stored as [BC, BP] into out (Bt, Dm, H, W), coalesced along positions:
            Triton converts the layout through shared memory, so the transpose costs no pass.
  backward: dz = g silu'(a) is needed around each position, so a program recomputes a and dz on
            a window of BPH positions that holds its TILE output positions plus E = P VW + P on
            each side, then shifts dz for each tap: through the program's own fp32 scratch
            window (written once, read back 9 times from L1/L2 after a barrier; SCRATCH) or in
            registers (tl.gather along positions). dx[q] = sum_d w_d dz[q - d] (stored channels
            last), dw_d += sum_q x[q] dz[q - d], db += sum_q dz[q] over the owned q. A program
            keeps one channel block and loops over tiles, so dw and db stay in registers; they
            are per-program partial sums in fp32, summed on the host (deterministic, no atomics).

The backward walks "virtual planes" of width VW: the real plane (VW = W) when it is narrow, else
NS column strips of CW owned columns plus P halo columns on both sides (VW = CW + 2P), so that the
halo E stays small against the window (_bwd_geometry picks the strips).

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import functools

import torch

from .._triton_env import availability, fix_interpreter_index, interpreting  # noqa: F401  (backend API)

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None


def _round_bf16(val, ptr, INTERP: constexpr):
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round to nearest even as the GPU does.
            bits = val.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            val = bits.to(tl.float32, bitcast=True)
    return val


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
    if EVEN:  # BP divides H W: one plane, contiguous positions (vectorised stores)
        q0 = t * BP
        b = q0 // L
        p = tl.multiple_of(q0 - b * L, BP) + tl.arange(0, BP)
        ok = p < L
    else:
        q = t * BP + tl.arange(0, BP)
        b = q // L
        p = q - b * L
        ok = q < NQ
    b = b.to(tl.int64)
    h = p // W
    w = p - h * W
    xrow = x_ptr + (b * sx_b + h * sx_h + w * sx_w)                 # [BP] pointers
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    for ki in range(K):   # a runtime loop over rows: all K K taps unrolled spilled (bwd)
        okh = ok & (h + (ki - P) >= 0) & (h + (ki - P) < H)
        for kj in tl.static_range(K):
            okw = okh & (w + (kj - P) >= 0) & (w + (kj - P) < W)
            wv = tl.load(w_ptr + c * sw_c + ki * sw_h + kj * sw_w, mask=mc, other=0.0).to(tl.float32)
            xv = tl.load(xrow[:, None] + ((ki - P) * sx_h + (kj - P) * sx_w) + c[None, :],
                         mask=okw[:, None] & mc[None, :], other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    y = _round_bf16(tl.trans(acc * tl.sigmoid(acc)), out_ptr, INTERP)  # [BC, BP]
    o = out_ptr + (b * Dm * L + p)                                       # out[b, 0, p]
    tl.store(o[None, :] + c[:, None] * L, y.to(out_ptr.dtype.element_ty), mask=mc[:, None] & ok[None, :])


def _dwconv_bwd_kernel(g_ptr, x_ptr, w_ptr, b_ptr, dx_ptr, dwp_ptr, dbp_ptr, scr_ptr,
                       Dm, H, W, NV, VW, CW, NS, POFS, TILE, n_tiles, n_tp, n_cb,
                       sg_b, sg_c, sg_h, sg_w, sx_b, sx_h, sx_w, sw_c, sw_h, sw_w,
                       HAS_BIAS: constexpr, SCRATCH: constexpr, INTERP: constexpr, K: constexpr,
                       P: constexpr, KKP: constexpr, BPH: constexpr, BC: constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    tp = pid // n_cb
    c = cb * BC + tl.arange(0, BC)
    mc = c < Dm
    E = P * VW + P
    i = tl.arange(0, BPH)
    kk = tl.arange(0, KKP)
    dw = tl.zeros((KKP, BC), dtype=tl.float32)     # this program's partial sums (one channel block)
    db = tl.zeros((BC,), dtype=tl.float32)
    scr = scr_ptr + pid.to(tl.int64) * (BPH * BC) + tl.arange(0, BC)[None, :]   # its own [BPH, BC]
    for t in range(tp, n_tiles, n_tp):
        # window slot i <-> virtual position v = (plane b, strip s, row h, column j): real column w
        v = t * TILE - E + i
        inv = (v >= 0) & (v < NV)
        v = tl.where(inv, v, 0)
        j = v % VW
        r = v // VW
        h = r % H
        r = r // H
        s = r % NS
        b = (r // NS).to(tl.int64)
        w = s * CW - POFS + j
        real = inv & (w >= 0) & (w < W)
        own = real & (j >= POFS) & (j < VW - POFS) & (i >= E) & (i < E + TILE)
        # pre-activation a and dz = g silu'(a) on the whole window (zero where not a real position)
        xrow = x_ptr + (b * sx_b + h * sx_h + w * sx_w)
        a = tl.zeros((BPH, BC), dtype=tl.float32)
        if HAS_BIAS:
            a += tl.load(b_ptr + c, mask=mc, other=0.0).to(tl.float32)[None, :]
        for ki in range(K):   # a runtime loop over rows: all K K taps unrolled spilled (bwd)
            okh = real & (h + (ki - P) >= 0) & (h + (ki - P) < H)
            for kj in tl.static_range(K):
                okw = okh & (w + (kj - P) >= 0) & (w + (kj - P) < W)
                wv = tl.load(w_ptr + c * sw_c + ki * sw_h + kj * sw_w, mask=mc, other=0.0).to(tl.float32)
                xv = tl.load(xrow[:, None] + ((ki - P) * sx_h + (kj - P) * sx_w) + c[None, :],
                             mask=okw[:, None] & mc[None, :], other=0.0).to(tl.float32)
                a += xv * wv[None, :]
        grow = g_ptr + (b * sg_b + h * sg_h + w * sg_w)
        gv = tl.load(grow[:, None] + c[None, :] * sg_c, mask=real[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
        sg = tl.sigmoid(a)
        dz = gv * (sg * (1.0 + a * (1.0 - sg)))
        mo = own[:, None] & mc[None, :]
        db += tl.sum(tl.where(mo, dz, 0.0), axis=0)
        xc = tl.load(xrow[:, None] + c[None, :], mask=mo, other=0.0).to(tl.float32)
        if SCRATCH:   # shifts through the program's scratch rows (L1/L2), not register shuffles
            tl.store(scr + i[:, None] * BC, dz)
            tl.debug_barrier()
        dx = tl.zeros((BPH, BC), dtype=tl.float32)
        for ki in range(K):   # a runtime loop over rows: all K K taps unrolled spilled (bwd)
            for kj in tl.static_range(K):
                # dz[q - d], d = (ki - P, kj - P): slot i - (di VW + dj) of the same virtual plane
                ok = own & (h - (ki - P) >= 0) & (h - (ki - P) < H) & (j - (kj - P) >= 0) & (j - (kj - P) < VW)
                src = tl.where(ok, i - ((ki - P) * VW + (kj - P)), 0)
                if SCRATCH:
                    gd = tl.load(scr + src[:, None] * BC, mask=ok[:, None], other=0.0)
                else:
                    gd = tl.gather(dz, tl.broadcast_to(src[:, None], (BPH, BC)), 0)
                    gd = tl.where(ok[:, None], gd, 0.0)
                wv = tl.load(w_ptr + c * sw_c + ki * sw_h + kj * sw_w, mask=mc, other=0.0).to(tl.float32)
                dx += gd * wv[None, :]
                dw += tl.where(kk[:, None] == ki * K + kj, tl.sum(xc * gd, axis=0)[None, :], 0.0)
        dx = _round_bf16(dx, dx_ptr, INTERP)
        drow = dx_ptr + ((b * H + h) * W + w) * Dm                    # dx contiguous channels last
        tl.store(drow[:, None] + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mo)
        if SCRATCH:
            tl.debug_barrier()   # every thread has read the scratch before the next tile rewrites it
    prow = tp.to(tl.int64) * Dm
    tl.store(dwp_ptr + (prow + c[None, :]) * (K * K) + kk[:, None], dw,
             mask=(kk[:, None] < K * K) & mc[None, :])
    tl.store(dbp_ptr + prow + c, db, mask=mc)


_HELPERS = ("_round_bf16",)
_KERNELS = ("_dwconv_fwd_kernel", "_dwconv_bwd_kernel")
_built: dict = {}


def _kernels() -> dict:
    if not _built:
        import triton
        import triton.language
        g = globals()
        g["tl"], g["constexpr"] = triton.language, triton.language.constexpr
        for name in _HELPERS + _KERNELS:  # helpers first: kernels find them by global name
            g[name] = triton.jit(g[name])
            _built[name] = g[name]
        if interpreting():
            fix_interpreter_index()
    return _built


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Not yet timed on a GPU; registers from benchmarks/compile_offline.py (sm_90, Triton 3.6, bf16).
# fwd: a [BP, BC] = 128 x 32 tile over 8 warps (16 values per thread): 88 registers (103 when
# tiles cross planes); 4 warps took 159-182. 32 bf16 channels are 64 contiguous bytes per
# position, 128 positions 256 contiguous output bytes per channel when a tile lies in one plane.
# bwd: a window of 256 positions x 16 channels over 8 warps: 255 registers and no spills; 512
# positions spilled (16-440 B), and the register-shuffle shift (SCRATCH False) spilled 24 B.
# The window's halo share at enc1 (W 128): 0.24 of the slots at 256, 0.18 at 512. Each of
# programs_per_sm x SMs programs keeps a 16 KB fp32 scratch window (L2-resident in total).
_DEFAULTS = {"fwd": dict(BP=128, BC=32, num_warps=8),
             "bwd": dict(BPH=256, BC=16, num_warps=8, programs_per_sm=4, SCRATCH=True)}
CONFIG_OVERRIDE: dict = {}
_SMS: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.lru_cache(maxsize=256)
def _bwd_geometry(W: int, P: int, BPH: int):
    """(NS, CW, VW, POFS, TILE): strips of the plane's columns for the backward window, chosen
    for the largest share of window slots that are owned output positions."""
    best = None
    for ns in range(1, W + 1):
        cw = -(-W // ns)
        if ns > 1 and cw * (ns - 1) >= W:     # the last strip would be empty
            continue
        pofs = P if ns > 1 else 0
        vw = cw + 2 * pofs
        tile = BPH - 2 * (P * vw + P)
        if tile < 1:
            continue
        eff = tile / BPH * W / (ns * vw)
        if best is None or eff > best[0]:
            best = (eff, (ns, cw, vw, pofs, tile))
    if best is None:
        raise ValueError(f"no backward window of {BPH} positions fits K = {2 * P + 1}; raise BPH")
    return best[1]


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


def _backward(g, x, weight, bias):
    """(dx (Bt, H, W, Dm) contiguous in x's dtype, dweight, dbias in the parameters' dtypes;
    dbias in weight's dtype when there is no bias)."""
    k = _kernels()
    Bt, H, W, Dm = x.shape
    K = weight.shape[-1]
    cfg = _config("bwd", Dm, K)
    ns, cw, vw, pofs, tile = _bwd_geometry(W, cfg["P"], cfg["BPH"])
    nv = Bt * ns * H * vw
    n_tiles = -(-nv // tile)
    dev = x.device
    if dev.type == "cuda":
        if dev not in _SMS:
            _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        slots = _SMS[dev] * cfg["programs_per_sm"]
    else:
        slots = 6  # the interpreter: a few programs, several tiles each
    # programs per channel block, each looping over tiles with its partial sums in registers
    n_tp = max(1, min(n_tiles, slots // cfg["n_cb"]))
    nprog = n_tp * cfg["n_cb"]
    dx = torch.empty((Bt, H, W, Dm), dtype=x.dtype, device=dev)
    dwp = torch.empty((n_tp, Dm, K * K), dtype=torch.float32, device=dev)
    dbp = torch.empty((n_tp, Dm), dtype=torch.float32, device=dev)
    scr = torch.empty((nprog, cfg["BPH"], cfg["BC"]) if cfg["SCRATCH"] else (1,), dtype=torch.float32, device=dev)
    k["_dwconv_bwd_kernel"][(nprog,)](
        g, x, weight, bias, dx, dwp, dbp, scr, Dm, H, W, nv, vw, cw, ns, pofs, tile, n_tiles, n_tp,
        cfg["n_cb"], *g.stride(), x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(2), weight.stride(3),
        HAS_BIAS=bias is not None, SCRATCH=cfg["SCRATCH"], INTERP=interpreting(), K=K, P=cfg["P"],
        KKP=_pow2(K * K), BPH=cfg["BPH"], BC=cfg["BC"], num_warps=cfg["num_warps"])
    dw = dwp.sum(0).view(weight.shape).to(weight.dtype)
    db = dbp.sum(0).to(weight.dtype if bias is None else bias.dtype)
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
    """The same two kernels as the ops above, for eager mode: torch.library's custom-op dispatch
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
